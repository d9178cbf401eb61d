"""Two "hosts" on one machine for multi-node tests: network namespaces joined by a veth pair.

Each host is a network namespace holding loopback and one end of a veth pair, named IFACE on both hosts as
a cluster's interfaces are, with an address in a private /24. The filesystem stays shared, as a cluster's
shared filesystem would be. /etc/netns/<namespace>/hosts (which `ip netns exec` mounts over /etc/hosts) makes
the machine's name resolve to the host's own address inside it, as each node's name does on a cluster.

Processes start on a host the ways a cluster offers: `Host.command` (ip netns exec), Open MPI through the
launch agent `TwoHosts.write_agent()` writes, or ssh through the sshd `TwoHosts.start_sshd()` runs in each
host. Closing the hosts kills every process left in them and deletes the namespaces.
"""
from __future__ import annotations

import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest

from support import REPO
from support.files import executable
from support.jobkill import wait_for
from support.multiproc import job_env

IFACE = "hvd0"
PREFIX = "hvdtest"  # namespace names: hvdtest-<pid>-<random>-<host index>
ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files, the iproute2 convention
LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> Optional[str]:
    """Why network namespaces cannot be made here (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install iproute2)"
    probe = f"{PREFIX}-probe-{os.getpid()}-{secrets.token_hex(3)}"
    added = ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


def ssh_unavailable_reason() -> Optional[str]:
    missing = [tool for tool in ("sshd", "ssh", "ssh-keygen") if find_tool(tool) is None]
    return f"needs {', '.join(missing)} (apt-get install openssh-server openssh-client)" if missing else None


def find_tool(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class Host:
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def counter(self, name: str) -> int:
        """A traffic counter of this host's IFACE, e.g. "tx_bytes" (sysfs as seen inside the namespace)."""
        path = f"/sys/class/net/{IFACE}/statistics/{name}"
        return int(subprocess.run(self.command(["cat", path]), capture_output=True, text=True, check=True,
                                  timeout=30).stdout)

    def set_link(self, up: bool) -> None:
        ip("-n", self.namespace, "link", "set", IFACE, "up" if up else "down")

    def pids(self) -> list:
        return [int(p) for p in ip("netns", "pids", self.namespace, check=False).stdout.split()]

    def command_lines(self) -> list:
        """The command lines of the processes running on this host."""
        lines = []
        for pid in self.pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                lines.append(" ".join(arg.decode(errors="replace") for arg in argv).strip())
            except OSError:  # it ended meanwhile
                pass
        return lines


class TwoHosts:
    """Context manager: two hosts on a fresh subnet; everything is torn down on exit, also after errors."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        token = f"{os.getpid()}-{secrets.token_hex(3)}"  # unique per run: parallel runs never share names
        subnet = f"10.231.{random.randrange(256)}"  # .0/24, private; a different one per run
        self.hosts = [Host(f"{PREFIX}-{token}-{i}", f"{subnet}.{i + 1}") for i in range(2)]
        self._processes: list = []  # (process, its log file)
        self._made_etc_netns = False

    def __enter__(self) -> "TwoHosts":
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._made_etc_netns = not ETC_NETNS.exists()
        a, b = self.hosts
        for host in self.hosts:
            ip("netns", "add", host.namespace)
        ip("link", "add", IFACE, "netns", a.namespace, "type", "veth", "peer", "name", IFACE, "netns", b.namespace)
        for host in self.hosts:
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", IFACE)
            ip("-n", host.namespace, "link", "set", "lo", "up")
            ip("-n", host.namespace, "link", "set", IFACE, "up")
            etc = ETC_NETNS / host.namespace
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{host.address} {socket.gethostname()}\n")

    def close(self) -> None:
        for proc, log in self._processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
        for host in self.hosts:
            for pid in host.pids():  # ranks, daemons and ssh sessions the job left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "delete", host.namespace, check=False)  # takes the veth pair with it
            shutil.rmtree(ETC_NETNS / host.namespace, ignore_errors=True)
        if self._made_etc_netns:
            try:
                ETC_NETNS.rmdir()  # unless a parallel run's hosts are in it now
            except OSError:
                pass

    def host_list(self, slots: int = 1) -> str:
        """horovodrun's and mpirun's -H value: "10.231.x.1:1,10.231.x.2:1"."""
        return ",".join(f"{host.address}:{slots}" for host in self.hosts)

    def write_agent(self) -> Path:
        """Open MPI's launch agent (plm_rsh_agent) for these hosts: `agent HOST COMMAND...` runs COMMAND on
        HOST as ssh would, through a shell with a login's environment, not the caller's."""
        cases = "\n".join(f"  {host.address}) ns={host.namespace} ;;" for host in self.hosts)
        return executable(self.workdir / "agent", f"""#!/bin/sh
host=$1; shift
case "$host" in
{cases}
  *) echo "agent: unknown host $host" >&2; exit 255 ;;
esac
exec env -i HOME="$HOME" SHELL=/bin/sh PATH={LOGIN_PATH} \\
  ip netns exec "$ns" /bin/sh -c "$*"
""")

    def start_sshd(self) -> Path:
        """An sshd on port 22 of each host, with throwaway keys; returns a folder holding an `ssh` that uses
        them. Put it first on the launcher's PATH: horovodrun calls plain `ssh`, and the user's ~/.ssh is
        neither read nor written (`ssh -F` skips ~/.ssh/config and does not create ~/.ssh)."""
        ssh_dir = self.workdir / "ssh"
        ssh_dir.mkdir(exist_ok=True)
        for key in ("host_key", "client_key"):
            subprocess.run([find_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", key, "-f",
                            str(ssh_dir / key)], check=True, timeout=30)
        shutil.copy(ssh_dir / "client_key.pub", ssh_dir / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for host in self.hosts:
            config = ssh_dir / f"sshd_{host.address}.conf"
            config.write_text(f"""ListenAddress {host.address}
Port 22
HostKey {ssh_dir / 'host_key'}
AuthorizedKeysFile {ssh_dir / 'authorized_keys'}
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
""")
            log_path = ssh_dir / f"sshd_{host.address}.log"
            log = open(log_path, "w")
            sshd = host.command([find_tool("sshd"), "-D", "-e", "-f", str(config)])  # -D -e: foreground, log to log
            self._processes.append((subprocess.Popen(sshd, stdout=log, stderr=subprocess.STDOUT), log))
            try:
                wait_for(lambda: "Server listening" in log_path.read_text(), "sshd's start", timeout=15)
            except AssertionError:
                raise RuntimeError(f"sshd on {host.address} did not start: {log_path.read_text()[-500:]}") from None
        client_config = ssh_dir / "ssh_config"
        client_config.write_text(f"""Host *
  IdentityFile {ssh_dir / 'client_key'}
  IdentitiesOnly yes
  UserKnownHostsFile {ssh_dir / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking accept-new
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
""")
        ssh = executable(ssh_dir / "bin" / "ssh",
                         f'#!/bin/sh\nexec {shlex.quote(find_tool("ssh"))} -F {shlex.quote(str(client_config))} "$@"\n')
        return ssh.parent


def launcher_env(cluster: TwoHosts, launcher: str, home: Path) -> dict:
    """The launcher's environment: for horovodrun an ssh that uses the test keys (and a HOME of its own for
    horovodrun's check cache), for mpirun Open MPI's consent to run as root."""
    env = job_env()
    if launcher == "horovodrun":
        reason = ssh_unavailable_reason()
        if reason:
            pytest.skip(reason)
        home.mkdir(exist_ok=True)
        env.update(PATH=f"{cluster.start_sshd()}{os.pathsep}{env['PATH']}", HOME=str(home))
    else:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def start_on_first_host(cluster: TwoHosts, command: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cluster.hosts[0].command(command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
