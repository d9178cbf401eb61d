"""The GPU code paths, checked on CPU: torch.cuda stubbed where a device is needed, real processes where the
launcher matters (issue 18). launch/gpu_check.sh checks the rest on a GPU node."""
import subprocess
import sys

import pytest
import torch
from support.multiproc import REPO, job_env, run_snippet
from support.trainrun import micro_overrides, train_args

from hvd_llama.cli import UserError
from hvd_llama.device import cuda_device_index, shared_gpu


# ---- 2. device binding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("local_rank, local_size, count, expected", [
    (3, 8, 1, 0),  # srun --gpus-per-task=1, Kubernetes, per-rank CUDA_VISIBLE_DEVICES: each rank sees its own GPU
    (0, 1, 1, 0),
    (3, 8, 8, 3),  # mpirun / horovodrun: every rank sees the node's GPUs
    (1, 2, 4, 1),  # fewer ranks than GPUs
])
def test_local_rank_maps_to_a_visible_device(local_rank, local_size, count, expected):
    assert cuda_device_index(local_rank, local_size, count, visible=None) == expected


def test_more_local_ranks_than_visible_devices_is_one_line():
    with pytest.raises(UserError) as err:
        cuda_device_index(2, 4, 2, visible="0,1")
    message = str(err.value)
    assert "4 ranks" in message and "2 CUDA device(s)" in message and "CUDA_VISIBLE_DEVICES=0,1" in message
    assert "\n" not in message


# parallel.init on real ranks with torch.cuda stubbed: which device each rank pins, or the error. argv: how many GPUs
# each rank sees; which physical GPU is behind a visible index (all: every rank sees the node's GPUs; own: each
# rank sees only its own; same: every rank sees the same one); whether Horovod has NCCL (nccl) or not.
BIND = """import sys, torch
from types import SimpleNamespace
import horovod.torch as hvd
from hvd_llama import parallel
from hvd_llama.cli import UserError
from hvd_llama.config import DistConfig
count, binding, nccl = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "nccl"
elastic = sys.argv[4:] == ["elastic"]
pinned = []
torch.cuda.device_count = lambda: count
torch.cuda.set_device = pinned.append
physical = {"all": lambda index: f"GPU-{index}", "own": lambda index: f"GPU-{hvd.local_rank()}",
            "same": lambda index: "GPU-0"}[binding]
torch.cuda.get_device_properties = lambda index: SimpleNamespace(uuid=physical(index))  # a _CUuuid in torch
hvd.nccl_built = lambda: 22703 if nccl else 0
try:
    device = parallel.init(DistConfig(elastic=elastic), "cuda")
    print(f"rank {parallel.rank()} device {device} pinned {pinned} threads {torch.get_num_threads()}")
except UserError as err:
    print(f"rank error: {err}")
"""


@pytest.mark.parametrize("count, binding, expected", [(1, "own", ["cuda:0", "cuda:0"]),
                                                     (2, "all", ["cuda:0", "cuda:1"])])
def test_dist_init_pins_the_mapped_device(tmp_path, count, binding, expected):
    job = run_snippet(BIND, tmp_path, [str(count), binding, "nccl"], np=2)
    assert job.returncode == 0, job.output[-3000:]
    lines = {rank: next(line for line in job.lines(rank) if line.startswith("rank")) for rank in (0, 1)}
    for rank in (0, 1):
        index = expected[rank].split(":")[1]
        assert f"device {expected[rank]} pinned [{index}]" in lines[rank], lines
        assert "threads" in lines[rank]


def test_dist_init_refuses_more_ranks_than_devices(tmp_path):
    job = run_snippet(BIND, tmp_path, ["2", "all", "nccl"], np=3, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    for rank in (0, 1, 2):
        assert any("rank error: 3 ranks on this node but this process sees 2 CUDA device(s) "
                   "(CUDA_VISIBLE_DEVICES=0,1)" in line
                   for line in job.lines(rank)), job.output[-3000:]


def rank_errors(job, np: int) -> set:
    """The error line each rank printed (one set element when they agree)."""
    assert job.returncode == 0, job.output[-3000:]
    return {next((line for line in job.lines(rank) if line.startswith("rank ")), "no line") for rank in range(np)}


def test_ranks_on_one_node_sharing_a_gpu_stop_in_one_line(tmp_path):
    """Each rank sees one GPU, the same one (CUDA_VISIBLE_DEVICES=0 given to every rank): device 0 for both."""
    import socket
    errors = rank_errors(run_snippet(BIND, tmp_path, ["1", "same", "nccl"], np=2), 2)
    assert errors == {f"rank error: ranks 0 and 1 on {socket.gethostname()} both use GPU GPU-0: each rank sees one "
                      "GPU but not its own; give each rank its own GPU (srun --gpus-per-task=1, a per-rank "
                      "CUDA_VISIBLE_DEVICES), or let every rank see all of the node's GPUs"}


def test_elastic_jobs_start_without_the_gpu_check(tmp_path):
    """A worker Horovod Elastic adds to a running job starts in init while the others wait in their state's sync:
    the check's collective would never be answered."""
    errors = rank_errors(run_snippet(BIND, tmp_path, ["1", "same", "none", "elastic"], np=2), 2)
    assert {line.split(" threads")[0] for line in errors} == {"rank 0 device cuda:0 pinned [0]",
                                                              "rank 1 device cuda:0 pinned [0]"}


@pytest.mark.parametrize("np, refused", [(2, True), (1, False)])  # one rank exchanges nothing with another GPU
def test_gpus_with_a_horovod_without_nccl_stop_in_one_line(tmp_path, np, refused):
    import socket
    [error] = rank_errors(run_snippet(BIND, tmp_path, [str(np), "all", "none"], np=np), np)
    assert error.startswith(f"rank error: Horovod on {socket.gethostname()} was built without NCCL") == refused
    assert error.endswith("rebuild it with launch/install.sh --cuda (it needs the CUDA toolkit: CUDA_HOME or nvcc "
                          "on PATH)") == refused


def test_a_torch_without_device_uuids_is_not_compared(monkeypatch):
    """torch.cuda.get_device_properties has .uuid from torch 2.4; hvd_llama runs on 2.1 and later."""
    from types import SimpleNamespace

    from hvd_llama.device import gpu_uuid
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=1 << 30))
    assert gpu_uuid(0) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=f"GPU-{index}"))
    assert gpu_uuid(3) == "GPU-3"


def test_gpu_error_decides_on_every_ranks_placement():
    from hvd_llama.parallel import gpu_error
    assert shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-1")]) is None  # two nodes: two GPUs
    assert shared_gpu([("a", None), ("a", None)]) is None  # torch < 2.4 cannot tell: not compared
    shared = shared_gpu([("a", "GPU-1"), ("a", "GPU-2"), ("b", "GPU-3"), ("a", "GPU-1"), ("a", "GPU-2")])
    assert shared.startswith("ranks 0 and 3 on a both use GPU GPU-1: ") and "\n" not in shared
    assert gpu_error([("a", "GPU-1", False)]) is None
    assert gpu_error([("a", "GPU-1", True), ("b", "GPU-1", True)]) is None
    missing = gpu_error([("b", "GPU-1", False), ("a", "GPU-1", True), ("c", "GPU-1", False), ("b", "GPU-2", False)])
    assert missing.startswith("Horovod on b, c was built without NCCL (hvd.nccl_built() is 0)")
    assert gpu_error([("a", "GPU-1", False), ("a", "GPU-1", False)]).startswith("ranks 0 and 1 on a")


# ---- 3. a world split by a failed MPI wire-up --------------------------------------------------------------
def test_world_size_check_reads_the_launchers_variables():
    from hvd_llama.parallel import check_world_size
    check_world_size(4, {"OMPI_COMM_WORLD_SIZE": "4"})
    check_world_size(1, {})
    check_world_size(1, {"SLURM_NTASKS": "16"})  # the batch script itself: one process may run alone
    check_world_size(1, {"HOROVOD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})  # horovodrun builds its own world
    check_world_size(8, {"OMPI_COMM_WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "1"})  # mpirun inside srun -n1
    for env in ({"OMPI_COMM_WORLD_SIZE": "4"}, {"PMI_SIZE": "16"}, {"SLURM_STEP_NUM_TASKS": "2"}):
        with pytest.raises(UserError, match=f"{next(iter(env))}="):
            check_world_size(1, env)


def test_training_as_a_lone_rank_of_a_bigger_world_stops_in_one_line(data_dir, tmp_path):
    """What each of 4 tasks would see if MPI had not connected them: a world of 1 under a launcher of 4."""
    run = subprocess.run([sys.executable, *train_args(tmp_path / "run", micro_overrides(data_dir))], cwd=REPO,
                         env=job_env({"OMPI_COMM_WORLD_SIZE": "4"}), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the launcher started 4 processes (OMPI_COMM_WORLD_SIZE=4)") and "world has 1" in last
    assert not (tmp_path / "run").exists()


# ---- 4. adasum ---------------------------------------------------------------------------------------------
def test_adasum_is_refused_at_validation_with_the_reason():
    from hvd_llama.config import load_config
    with pytest.raises(UserError) as err:
        load_config(overrides=["dist.op=adasum"])
    assert "dist.op=adasum is not supported" in str(err.value) and "clipping" in str(err.value)
    assert "\n" not in str(err.value)
    assert load_config(overrides=["dist.op=average"]).dist.op == "average"
    with pytest.raises(UserError, match="dist.op='sum': expected one of average"):
        load_config(overrides=["dist.op=sum"])


# ---- 6a. CUDA RNG state: the rank's own device --------------------------------------------------------------
class FakeCudaRng:
    """torch.cuda's RNG functions for a process that pins `current` among `count` visible devices."""

    def __init__(self, current: int, count: int):
        self.current, self.count, self.states = current, count, {}

    def get_rng_state(self, device="cuda"):
        return torch.tensor([100 + self.index(device)], dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.states[self.index(device)] = int(state[0])

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise IndexError(f"device {index} of {self.count}")
        return index

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        for name in ("get_rng_state", "set_rng_state"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in ("get_rng_state_all", "set_rng_state_all"):  # every device's state: must not be used
            monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"torch.cuda.{name} called"))


def test_cuda_rng_state_is_the_ranks_own_device_and_restores_with_fewer_visible(monkeypatch):
    from hvd_llama.training.checkpointing import rng_state, set_rng_state
    FakeCudaRng(current=3, count=8).install(monkeypatch)  # rank 3 of a node where every rank sees 8 GPUs
    state = rng_state()
    assert int(state["cuda"][0]) == 103
    resumed = FakeCudaRng(current=0, count=1)  # resumed under srun --gpus-per-task=1: one visible GPU
    resumed.install(monkeypatch)
    set_rng_state(state)
    assert resumed.states == {0: 103}


def test_rng_state_without_cuda_in_use_has_no_cuda_part(monkeypatch):
    from hvd_llama.training.checkpointing import rng_state, set_rng_state
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    state = rng_state()
    assert state["cuda"] is None
    before = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), before)


# ---- max_memory_gib: training's peak, not set-up's --------------------------------------------------------------
# Trainer.run on its CUDA path in one process, the steps faked (no GPU here): when the peak statistic is reset.
PEAK = """import sys, torch
from pathlib import Path
from types import SimpleNamespace
from hvd_llama import parallel
from hvd_llama.config import load_config
from hvd_llama.training import trainer as loop
from hvd_llama.training.metrics import MetricsLogger
run_dir, events = Path(sys.argv[1]), []
cfg = load_config(None, sys.argv[3::2])  # the values of --set k=v
parallel.init(cfg.dist, "cpu")
trainer = loop.Trainer(cfg, run_dir, torch.device("cpu"))
trainer.device = torch.device("cuda", 0)  # run()'s CUDA path; nothing below touches the device
loop.job_peak_flops = lambda cfg, device: events.append("peak measured") or (1e12, "stub")
torch.cuda.reset_peak_memory_stats = lambda device: events.append(f"peak statistic reset on {device}")
torch.cuda.max_memory_allocated = lambda device: 3 * 2**29
def step(*args, **kwargs):
    events.append("step")
    return SimpleNamespace(loss_sum=1.0, n_targets=1, grad_norm=0.5, stepped=True)
loop.train_step = step
run_dir.mkdir(parents=True)
trainer.run(MetricsLogger(run_dir, True, False, 1))
print("events:", events)
"""


def test_the_logged_peak_memory_starts_after_set_up(small_data, tmp_path):
    """Set-up (rank 0's pretrained weights, a resume, the matmuls of the peak measurement) can reach a higher
    peak than training's own steps: max_memory_gib is what the memory planner predicts only without them."""
    from support.trainrun import metrics
    job = run_snippet(PEAK, tmp_path, [str(tmp_path / "run"), *micro_overrides(small_data, **{"train.max_steps": 2})],
                      np=0)
    assert job.returncode == 0, job.output[-3000:]
    assert "events: ['peak measured', 'peak statistic reset on cuda:0', 'step', 'step']" in job.output
    assert [r["max_memory_gib"] for r in metrics(tmp_path / "run")] == [1.5, 1.5]


# ---- 9b. TF32 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, enabled, expected", [("cuda", True, ["high"]), ("cuda", False, ["highest"]),
                                                       ("cpu", True, [])])
def test_tf32_switch_sets_the_matmul_precision_on_cuda_only(monkeypatch, device, enabled, expected):
    from hvd_llama.device import allow_tf32
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    allow_tf32(torch.device(device), enabled)
    assert calls == expected


def test_tf32_is_a_train_setting_on_by_default():
    from hvd_llama.config import load_config
    assert load_config().train.tf32 is True
    assert load_config(overrides=["train.tf32=false"]).train.tf32 is False


# ---- 7a. the loss a chunk of tokens at a time -----------------------------------------------------------------
def micro_model():
    from hvd_llama.model import ModelConfig, Transformer
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))


def losses_grads_saved(model, inputs, targets, chunk: int, precision: str = "fp32"):
    """Per-token losses, every gradient, and the bytes autograd saved for backward during the forward."""
    from hvd_llama.training.compute import model_token_losses
    model.zero_grad()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = model_token_losses(model, inputs, targets, torch.device("cpu"), precision, chunk)
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("chunk", [32, 48])  # 128 tokens: 4 equal chunks, or 48 + 48 + 32
def test_chunked_loss_equals_the_whole_one_and_saves_less(chunk):
    model = micro_model()
    batch = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[0, :5] = -100  # masked targets (a fine-tuning prompt) inside the first chunk
    whole, whole_grads, whole_saved = losses_grads_saved(model, inputs, targets, chunk=0)
    chunked, chunked_grads, chunked_saved = losses_grads_saved(model, inputs, targets, chunk)
    assert chunked.shape == whole.shape == (128,) and bool((chunked[:5] == 0).all())
    assert (chunked - whole).abs().max().item() <= 1e-6
    for name, grad in whole_grads.items():  # the output head's gradient is a sum over chunks: fp32 rounding
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # The whole loss keeps full-vocabulary tensors (log_softmax's output: 4 bytes x 128 tokens x 512); the
    # chunked one keeps none: checkpointing holds only each chunk's hidden-state input (a view, 4 x 128 x 64
    # bytes in all, not seen by the hooks), and recomputes its logits in backward.
    logits_bytes, hidden_bytes = 4 * 128 * 512, 4 * 128 * 64
    assert chunked_saved + hidden_bytes <= whole_saved - logits_bytes


def relative_error(grads: dict, reference: dict) -> float:
    return max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())


def test_chunked_loss_under_bf16_autocast_is_as_accurate_and_equal_without_grad():
    from hvd_llama.training.compute import model_token_losses
    model = micro_model()
    batch = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(2))
    inputs, targets, cpu = batch[:, :-1], batch[:, 1:], torch.device("cpu")
    _, reference, _ = losses_grads_saved(model, inputs, targets, 0, "fp32")
    whole, whole_grads, _ = losses_grads_saved(model, inputs, targets, 0, "bf16")
    chunked, chunked_grads, _ = losses_grads_saved(model, inputs, targets, 40, "bf16")
    assert (chunked - whole).abs().max().item() <= 1e-6
    # bf16 matmul gradients differ from fp32 by bf16 rounding (~1% here); each chunk's head gradient is
    # rounded on its own, and summed in fp32: no further from fp32 than the whole loss's.
    whole_error = relative_error(whole_grads, reference)
    assert whole_error < 0.02 and relative_error(chunked_grads, reference) <= 1.25 * whole_error
    with torch.no_grad():
        scored = model_token_losses(model, inputs, targets, cpu, "fp32", 40)
        assert (scored - model_token_losses(model, inputs, targets, cpu, "fp32", 0)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_training_with_a_chunked_loss_takes_the_same_steps_on_two_ranks(data_dir, tmp_path):
    """Under Horovod's gradient hooks: the head's gradient, summed over 5 chunks of 24/8 tokens, is reduced once."""
    from support.trainrun import losses, train_job
    runs = {}
    for chunk in (0, 24):  # 4 x 32 tokens per rank: chunks of 24, the last one 8
        run_dir = tmp_path / f"chunk{chunk}"
        job = train_job(run_dir, micro_overrides(data_dir, **{"train.loss_chunk": chunk, "train.max_steps": 4}))
        assert job.returncode == 0, job.output[-3000:]
        runs[chunk] = losses(run_dir)
    assert len(runs[0]) == 4 and runs[24] == pytest.approx(runs[0], rel=1e-5, abs=1e-6)


# ---- 9d. bf16 weights in evaluate and generate ----------------------------------------------------------------
def one_process_json(module, tmp_path, name, *args):
    from support.multiproc import run_one_process
    out = tmp_path / f"{name}.json"
    result = run_one_process(module, *args, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    return json.loads(out.read_text()), result


def test_bf16_evaluate_is_within_two_percent_of_fp32(micro_run, tmp_path):
    fp32, _ = one_process_json("hvd_llama.evaluate", tmp_path, "fp32", "--checkpoint", micro_run, "--threads", 1)
    bf16, run = one_process_json("hvd_llama.evaluate", tmp_path, "bf16", "--checkpoint", micro_run, "--threads", 1,
                                 "--dtype", "bf16")
    assert bf16["dtype"] == "bf16" and fp32["dtype"] == "fp32" and bf16["tokens"] == fp32["tokens"]
    assert bf16["loss_per_token"] == pytest.approx(fp32["loss_per_token"], rel=0.02)
    assert bf16["loss_sum_nats"] != fp32["loss_sum_nats"]  # the bf16 weights really ran
    assert "fp32, bf16 weights" in run.stdout


def test_bf16_generate_runs_and_returns_text(micro_run):
    from support.multiproc import run_one_process
    result = run_one_process("hvd_llama.generate", "--checkpoint", micro_run, "--prompt", "def main(",
                             "--max-new-tokens", 12, "--temperature", 0, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main(") and len(result.stdout) > len("def main(\n")
    assert "| bf16 | cpu" in result.stderr and "generated 12 tokens" in result.stderr


def test_bf16_weights_are_bf16_and_exclude_int8(micro_run):
    from hvd_llama.use.inference import check_dtype, load_model
    model, _, _ = load_model(micro_run, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32  # logits stay fp32 for sampling and the loss
    with pytest.raises(UserError, match="--dtype bf16 and --quantize int8"):
        check_dtype("bf16", "int8")


# ---- 5. elastic commits in host memory ------------------------------------------------------------------------
def test_elastic_commits_are_host_copies_and_restore_puts_them_back():
    from hvd_llama.parallel.elastic import ElasticState
    model = micro_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_once():
        model(torch.randint(0, 512, (2, 8))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    train_once()  # some optimizer state to commit
    state = ElasticState(model, optimizer, progress={"step": 1, "samples": 2})
    state.save()  # commit() = save() + a collective check for host changes
    committed_model, committed_optimizer = state._committed
    for name, tensor in committed_model.items():
        assert tensor.device.type == "cpu" and tensor.data_ptr() != model.state_dict()[name].data_ptr()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    for _ in range(2):  # train, roll back, train again, roll back: the second rollback must find the same commit
        train_once()
        state.progress = {"step": 2, "samples": 4}
        assert not torch.equal(model.output.weight, weights["output.weight"])
        state.restore()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        assert all(torch.equal(optimizer.state_dict()["state"][k]["exp_avg"], v) for k, v in moments.items())
        assert state.progress == {"step": 1, "samples": 2}  # the data position is a committed value too
    # The next commit reuses the host buffers of the last one, with the new values.
    train_once()
    state.save()  # commit() = save() + a collective check for host changes
    assert all(state._committed[0][k] is tensor for k, tensor in committed_model.items())
    assert torch.equal(state._committed[0]["output.weight"], model.output.weight.detach())
    assert state._committed[1]["state"][0]["exp_avg"] is committed_optimizer["state"][0]["exp_avg"]


def test_host_copy_keeps_the_structure():
    from hvd_llama.parallel.elastic import host_copy
    tree = {"a": torch.ones(2), "b": [torch.zeros(3), 4, "x"], "c": (torch.arange(2), None)}
    copied = host_copy(tree)
    assert copied["b"][1:] == [4, "x"] and copied["c"][1] is None and isinstance(copied["c"], tuple)
    assert torch.equal(copied["a"], tree["a"]) and copied["a"].data_ptr() != tree["a"].data_ptr()
    tree["a"].add_(1)
    assert torch.equal(copied["a"], torch.ones(2))  # a copy, not a view
    again = host_copy({"a": torch.full((3,), 5.0), "b": [torch.ones(3), 5, "y"], "c": (torch.arange(2), None)}, copied)
    assert again["a"].shape == (3,) and again["b"][0] is copied["b"][0] and torch.equal(again["b"][0], torch.ones(3))


# ---- 9a. compile per block: gradients of later blocks are ready while earlier blocks are still in backward ------
class MarkedBlock(torch.nn.Module):
    """A block, run as it is (compiled or not), that records when backward reaches its output: the moment just
    before its own backward starts."""

    def __init__(self, block, index: int, events: list):
        super().__init__()
        self.block, self.index, self.events = block, index, events

    @property
    def attention(self):  # Transformer reads the KV cache state from its first layer's attention
        return self.block.attention

    def forward(self, x, *args):
        out = self.block(x, *args)
        out.register_hook(lambda grad: self.events.append(("backward reaches block", self.index)))
        return out


def test_per_block_compile_keeps_gradients_ready_block_by_block():
    """Horovod's DistributedOptimizer allreduces each gradient from a hook run when it is accumulated. Per-block
    compile must keep those hooks firing block by block. The aot_eager backend builds the same autograd structure
    as Inductor (one autograd function per compiled region; Inductor only generates the kernels inside) in
    seconds instead of a minute on this CPU; a GPU node runs Inductor itself (launch/gpu_check.sh)."""
    model, events = micro_model(), []
    n_layers = len(model.layers)
    model.compile_blocks(backend="aot_eager")
    assert all(layer._compiled_call_impl is not None for layer in model.layers)  # each block compiled on its own
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in micro_model().named_parameters()]
    for index, layer in enumerate(model.layers):
        for name, param in layer.named_parameters():
            param.register_post_accumulate_grad_hook(lambda p, index=index: events.append(("grad ready", index)))
        model.layers[index] = MarkedBlock(layer, index, events)
    eager = micro_model()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = model(tokens)
    torch.testing.assert_close(logits, eager(tokens), rtol=1e-5, atol=1e-5)
    logits.square().mean().backward()
    # Backward reaches the last block, all its gradients are ready, then it reaches the block before, and so on.
    params_per_block = len(list(eager.layers[0].parameters()))
    expected = [event for index in reversed(range(n_layers))
                for event in [("backward reaches block", index)] + [("grad ready", index)] * params_per_block]
    assert events == expected


# ---- 11. launch/gpu_check.sh: its commands (dry run) and its checks (on fabricated run folders) ---------------
def gpu_check_dry_run(tmp_path, *args, **env):
    import os
    return subprocess.run([str(REPO / "launch" / "gpu_check.sh"), "-o", str(tmp_path / "check"), *args],
                          env=dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **env), capture_output=True,
                          text=True, timeout=60)


def printed_commands(stdout: str) -> list:
    import shlex
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_gpu_check_dry_run_prints_every_check_with_valid_settings(tmp_path):
    from hvd_llama.config import load_config
    result = gpu_check_dry_run(tmp_path, GPUS="2", GPU_MEMORY=str(80 << 30))
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    trains = {c[c.index("--run-dir") + 1].rsplit("/", 1)[1]: c for c in commands if "hvd_llama.train" in c}
    assert list(trains) == ["bf16", "fp16", "compiled", "bf16_again", "bf16_resumed", "1b", "np1_b16", "np2_b8",
                            "np2_b16"]
    for name, command in trains.items():  # every override is one train accepts (the planner's batch aside)
        overrides = [v for k, v in zip(command, command[1:]) if k == "--set" and "<planner" not in v]
        cfg = load_config(str(REPO / "configs" / "small.yaml"), overrides)
        assert cfg.train.device == "cuda", name
    assert "train.compile=true" in trains["compiled"] and "train.precision=fp16" in trains["fp16"]
    assert trains["bf16_resumed"][-2:] == ["--resume", str(tmp_path / "check/runs/bf16/checkpoints/step_00000020")]
    assert trains["np2_b8"][:5] == ["horovodrun", "-np", "2", "-H", "localhost:2"]
    assert "train.batch_size=<planner max batch>" in trains["1b"] and "dist.zero_stage=2" in trains["1b"]
    doctor = next(c for c in commands if "hvd_llama.doctor" in c)
    assert doctor[:3] == ["horovodrun", "-np", "2"] and "--json" in doctor
    # The planner command runs as printed (on the meta device) and finds a batch for the 1B shape in 80 GiB.
    plan = next(c for c in commands if "hvd_llama.plan" in c)
    planned = subprocess.run(plan, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120)
    import json
    assert json.loads(planned.stdout)["max_batch_size"] >= 1, planned.stderr
    assert "dry run: nothing was run" in result.stdout and not (tmp_path / "check").exists()


def test_gpu_check_on_one_gpu_skips_the_two_rank_checks(tmp_path):
    result = gpu_check_dry_run(tmp_path, "-g", "1")
    assert result.returncode == 0 and "skip np2: 1 GPU" in result.stdout
    assert not any("horovodrun" == c[0] and "hvd_llama.train" in c for c in printed_commands(result.stdout))


@pytest.mark.parametrize("args, message", [(["-g", "0"], "no GPU visible"), (["-g", "x"], "-g x: expected"),
                                           (["--bogus"], "unknown argument '--bogus'"), (["-o"], "-o needs a value")])
def test_gpu_check_bad_arguments_are_one_line_exit_2(tmp_path, args, message):
    import os
    result = subprocess.run([str(REPO / "launch" / "gpu_check.sh"), *args], env=dict(os.environ, DRY_RUN="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def write_run(run_dir, losses, mfu=0.4, memory=True, first_step=1, weights=None):
    import json
    run_dir.mkdir(parents=True)
    rows = [{"step": first_step + i, "loss": loss, "mfu": mfu, "tokens_per_s": 1000.0 * (1 + i % 2),
             **({"max_memory_gib": 1.5} if memory else {})} for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if weights is not None:
        (run_dir / "checkpoints" / "step_00000030").mkdir(parents=True)
        torch.save(weights, run_dir / "checkpoints" / "step_00000030" / "model.pt")


def gpu_check_py(*args):
    """launch/gpu_check.py's main in this process: (exit status, what it printed)."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = module.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), "")


def test_gpu_check_run_figures_and_failures(tmp_path):
    write_run(tmp_path / "good", [8.0, 7.0, 6.5] * 5 + [5.0])
    good = gpu_check_py("run", tmp_path / "good")
    assert good.returncode == 0 and "16 steps, loss 8.000 -> 5.000, MFU 40.0%" in good.stdout
    assert "peak 1.50 GiB" in good.stdout
    write_run(tmp_path / "bad", [8.0, 9.0], mfu=1.3, memory=False)
    bad = gpu_check_py("run", tmp_path / "bad")
    assert bad.returncode == 1
    for problem in ("the loss did not go down", "MFU above 100%", "no max_memory_gib logged"):
        assert problem in bad.stdout
    assert gpu_check_py("run", tmp_path / "missing").returncode == 1
    assert gpu_check_py("bogus", tmp_path).returncode == 2


@pytest.mark.parametrize("again_delta, resumed_delta, ok", [(0.0, 0.0, True), (0.0, 1e-6, False),
                                                            (1e-3, 1e-3, True), (1e-4, 1e-2, False)])
def test_gpu_check_resume_compares_with_a_rerun(tmp_path, again_delta, resumed_delta, ok):
    weights = {"w": torch.arange(4.0)}
    losses = [5.0 - 0.1 * i for i in range(10)]
    write_run(tmp_path / "bf16", [8.0] * 20 + losses, weights=weights)
    write_run(tmp_path / "bf16_again", [8.0] * 20 + [x + again_delta for x in losses],
              weights={"w": weights["w"] + again_delta})
    write_run(tmp_path / "bf16_resumed", [x + resumed_delta for x in losses], first_step=21,
              weights={"w": weights["w"] + resumed_delta})
    result = gpu_check_py("resume", tmp_path)
    assert (result.returncode == 0) == ok, result.stdout
    assert ("bit for bit" in result.stdout and "not bit for bit" not in result.stdout) == (resumed_delta == 0)


def test_gpu_check_np2_equivalence_and_scaling(tmp_path):
    write_run(tmp_path / "np1_b16", [8.0, 7.0, 6.0, 5.5, 5.0, 4.8])
    write_run(tmp_path / "np2_b8", [8.0, 7.0, 6.0, 5.5, 5.0, 4.8 * (1 + 1e-6)])
    write_run(tmp_path / "np2_b16", [8.0] * 6)
    result = gpu_check_py("np2", tmp_path)
    assert result.returncode == 0 and "over 6 steps" in result.stdout and "50% scaling efficiency" in result.stdout
    (tmp_path / "np2_b8" / "metrics.jsonl").unlink()
    (tmp_path / "np2_b8").rmdir()
    write_run(tmp_path / "np2_b8", [8.0, 7.1, 6.0, 5.5, 5.0, 4.8])
    assert gpu_check_py("np2", tmp_path).returncode == 1


def test_cpu_defaults_fill_only_what_the_launcher_or_user_left_unset():
    from hvd_llama.parallel import CPU_HOROVOD_ENV, cpu_defaults
    env = {"HOROVOD_CYCLE_TIME": "2"}  # horovodrun --cycle-time-ms 2
    applied = cpu_defaults(env)
    assert env["HOROVOD_CYCLE_TIME"] == "2" and "HOROVOD_CYCLE_TIME" not in applied
    assert applied == {"OMPI_MCA_mpi_yield_when_idle": "1"} == {k: env[k] for k in applied}
    fresh = {}
    assert cpu_defaults(fresh) == CPU_HOROVOD_ENV == fresh
