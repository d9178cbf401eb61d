#!/usr/bin/env bash
# Example host discovery script for Horovod Elastic: prints the hosts that may run workers now, one
# "hostname:slots" per line. This one reads them from a file (default launch/hosts.txt) that you (or your
# scheduler) edit while the job runs; Horovod calls it every few seconds and grows or shrinks the job.
# Replace it with a query of your cluster manager (e.g. `scontrol show hostnames`, a cloud API).
cat "${HVD_LLAMA_HOSTS_FILE:-$(dirname "$0")/hosts.txt}"
