"""ZeRO stages 1-2 (hvd_llama/parallel/zero.py): the flat layout, slice state, and real multi-process training
against stage 0 (hvd.DistributedOptimizer) and plain torch.optim.AdamW. The jobs run tests/support/zero_job.py."""
import json
import math

import pytest
import torch
from support import REPO
from support.multiproc import run_job
from support.zero_job import ACCUM, GRAD_ACCUM, LR, MAX_NORM, POISON_STEP, SMALL_BUCKETS

from hvd_llama.training.memory import ParamCounts, model_state_bytes
from hvd_llama.training.zero_layout import STATE_FORMAT, FlatLayout, merge_slices

ZERO_JOB = REPO / "tests" / "support" / "zero_job.py"


def results(job, rank: int) -> list:
    return [json.loads(line.split("RESULT ", 1)[1]) for line in job.lines(rank) if line.startswith("RESULT ")]


def zero_job(mode: str, *args: str, np: int = 2, launcher: str = "horovodrun", timeout: float = 300) -> list:
    """Run the job; return each rank's results (rank 0 first), after checking it succeeded."""
    job = run_job([str(ZERO_JOB), mode, *args], np=np, launcher=launcher, timeout=timeout)
    assert job.returncode == 0, job.output[-4000:]
    if not np:  # a plain process: its lines are untagged
        return [[json.loads(line[7:]) for line in job.output.splitlines() if line.startswith("RESULT ")]]
    return [results(job, rank) for rank in range(np)]


# ---- the layout: pure arithmetic --------------------------------------------------------------------------------
NUMELS = [5, 13, 1, 8, 21, 3, 7]  # 58 elements


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("bucket_elements", [1, 9, 30, 10**6])
def test_layout_gives_every_element_one_owner_and_equal_padded_shards(world, bucket_elements):
    layouts = [FlatLayout(NUMELS, world, rank, bucket_elements) for rank in range(world)]
    owned = sorted((p.global_start, p.global_start + p.numel) for layout in layouts for p in layout.pieces)
    assert owned[0][0] == 0 and owned[-1][1] == sum(NUMELS)
    assert all(a[1] == b[0] for a, b in zip(owned, owned[1:]))  # no gap, no overlap
    buckets = layouts[0].buckets
    assert buckets[0].last == len(NUMELS)  # the last parameters first: backward produces them first
    assert sorted((b.first, b.last) for b in buckets)[0][0] == 0
    for b in buckets:  # whole parameters, at most bucket_elements unless one parameter is larger
        assert b.numel == sum(NUMELS[b.first:b.last])
        assert b.numel <= bucket_elements or b.last - b.first == 1
        assert b.shard_numel == math.ceil(b.numel / world)
    shard = layouts[0].shard_numel
    assert {layout.shard_numel for layout in layouts} == {shard}
    assert 0 <= shard - math.ceil(sum(NUMELS) / world) < len(buckets)  # padding: under one element per bucket
    if len(buckets) == 1:
        assert shard == math.ceil(sum(NUMELS) / world)
    for layout in layouts:  # pieces sit inside the shard without overlapping
        spans = sorted((p.shard_offset, p.shard_offset + p.numel) for p in layout.pieces)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and (not spans or spans[-1][1] <= shard)


def test_stage_0_groups_gradients_in_buckets_in_backward_order():
    from hvd_llama.parallel import gradient_groups
    params = [torch.zeros(n) for n in NUMELS]
    groups = gradient_groups(params, 20)
    assert groups[0][-1] is params[-1]  # the gradients backward produces first
    assert sorted(id(p) for g in groups for p in g) == sorted(map(id, params))  # each parameter once
    for g in groups:  # consecutive parameters, at most 20 elements unless one parameter is larger
        first = next(i for i, p in enumerate(params) if p is g[0])
        assert all(p is q for p, q in zip(g, params[first:]))
        assert sum(p.numel() for p in g) <= 20 or len(g) == 1
    assert len(groups) == 4 and gradient_groups(params, 0) is None  # 0: Horovod's per-cycle fusion


def test_layout_rejects_a_nonpositive_bucket_size():
    with pytest.raises(ValueError, match="bucket_elements"):
        FlatLayout(NUMELS, 2, 0, 0)


def slice_dict(ranges, step=3, **extra) -> dict:
    """A slice as ShardedOptimizer.state_dict writes it, of params a (2x3) and b (5,): values = global index. The
    runs sit in the shard in reverse order, each followed by a padding element (as buckets are laid out from the
    last parameter backwards, each padded to the world size)."""
    parts, offsets, at = [], {}, 0
    for start, end in reversed(ranges):
        offsets[(start, end)] = at
        parts += [torch.arange(start, end, dtype=torch.float32), torch.tensor([-1.0])]
        at += end - start + 1
    values = torch.cat(parts)
    return {"format": STATE_FORMAT, "params": [("a", (2, 3)), ("b", (5,))], "ranges": ranges,
            "offsets": [offsets[r] for r in ranges], "step": step, "exp_avg": values, "exp_avg_sq": -values, **extra}


def test_merge_slices_rebuilds_each_parameter_from_any_split():
    merged = merge_slices([slice_dict([(4, 8), (10, 11)]), slice_dict([(0, 4), (8, 10)])])
    assert merged["step"] == 3
    assert torch.equal(merged["state"]["a"]["exp_avg"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(merged["state"]["b"]["exp_avg_sq"], -torch.arange(6.0, 11.0))
    assert "master" not in merged["state"]["a"]


def test_merge_slices_refuses_incomplete_or_foreign_state():
    with pytest.raises(ValueError, match=r"do not cover elements \[8, 11\)"):
        merge_slices([slice_dict([(0, 8)])])  # a rank's slice file missing
    with pytest.raises(ValueError, match="different steps"):
        merge_slices([slice_dict([(0, 4)]), slice_dict([(4, 11)], step=4)])
    with pytest.raises(ValueError, match="not a sharded optimizer slice"):
        merge_slices([{"state": {}, "param_groups": []}])  # a stage-0 torch AdamW state dict


# ---- real processes ---------------------------------------------------------------------------------------------
def test_one_process_matches_plain_torch_adamw():
    """np=1 without a launcher: stages 1 and 2 take the path of plain AdamW plus clip_grad_norm_."""
    (records,) = zero_job("single", np=0)
    plain = records[0]["records"]
    for result in records[1:]:
        assert [r["loss"] for r in result["records"]] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
        assert [r["norm"] for r in result["records"]] == pytest.approx([r["norm"] for r in plain], rel=1e-5)
        assert result["param_diff"] < 1e-6
        owned = sorted(tuple(r) for r in result["ranges"])
        assert owned[0][0] == 0 and owned[-1][1] == result["P"] and all(a[1] == b[0] for a, b in zip(owned, owned[1:]))
        assert result["shard"] == result["P"]


@pytest.mark.slow  # 10-30 s each on 2 shared cores
@pytest.mark.parametrize("np_, launcher", [(2, "horovodrun"), (3, "horovodrun")])  # mpirun: test_sharded_training
def test_stages_1_and_2_match_stage_0(np_, launcher):
    """5 steps, grad_accum=2, clipping active, different data per rank, P not a multiple of the world size."""
    ranks = [{r["name"]: r for r in rank} for rank in zero_job("equivalence", np=np_, launcher=launcher)]
    assert len(ranks[0]) == 9
    for name, result in ranks[0].items():
        reference = ranks[0][{"fp16": "fp16_s0", "lora": "lora_s0"}.get(name.split("_")[0], "s0")]
        P, N, stage = result["P"], np_, result["stage"]
        assert P % N, "the trainable parameter count must not be a multiple of the world size"
        digests = [[r["digest"] for r in rank[name]["records"]] for rank in ranks]
        assert all(d == digests[0] for d in digests), f"{name}: ranks hold different parameters"
        # fp16 compression with predivision (stage 0 then fuses per cycle: Horovod's grouped allreduce drops
        # the predivide factor). At np=2 a sum of two fp16 values does not depend on order, so both stages do
        # the same arithmetic: the mean difference stays near fp32's (1.6e-8 here; 2.3e-6 while stage 0 lost
        # the factor). At np=3 the stages add in different orders, so their sums differ by one unit in the last
        # place in some elements, which ones depending on Horovod's fusion timing; Adam turns a 1-ulp change of
        # a gradient near zero into up to one lr step of that parameter, and later gradients follow: the
        # largest difference stays under the largest lr, the mean far under it (2e-6 to 1.6e-5 here, loaded).
        fp16 = name.startswith("fp16")
        rel, max_param, moments = (1e-4, LR, 5e-2) if fp16 else (1e-5, 1e-6, 1e-4)
        mean_param = (LR / 100 if N > 2 else 1e-6) if fp16 else 1e-8
        losses, norms = ([r[k] for r in result["records"]] for k in ("loss", "norm"))
        assert losses == pytest.approx([r["loss"] for r in reference["records"]], rel=rel), name
        assert norms == pytest.approx([r["norm"] for r in reference["records"]], rel=rel, nan_ok=True), name
        assert not math.isfinite(norms[POISON_STEP]), name  # one rank's NaN reaches every rank's norm
        assert digests[0][POISON_STEP] == digests[0][POISON_STEP - 1], name  # and the step is skipped
        assert min(n for n in norms if math.isfinite(n)) > MAX_NORM  # clipping really clipped
        assert result["param_diff"] < max_param and result["param_mean_diff"] < mean_param, name
        weights = result["bytes"]["weights"]
        if stage == 0:
            # AdamW's moments and its 4-byte step counter per tensor
            assert result["bytes_after_reduce"] == {"weights": weights, "gradients": 4 * P,
                                                    "optimizer": 8 * P + 4 * result["tensors"]}
            continue
        S = result["shard_numel"]["grad_shard"]
        assert set(result["shard_numel"].values()) == {S}
        assert 0 <= S - math.ceil(P / N) < result["buckets"], name  # ceil(P/N) plus padding under 1 per bucket
        if result["buckets"] == 1:
            assert S == math.ceil(P / N)
        # grad_accum > 1: the micro-steps are summed in fp32 bucket buffers (padded to a multiple of N), param.grad
        # freed as each pass adds it in; reduce_gradients frees the buffers and only the slice stays
        assert result["bytes_accumulating"]["gradients"] == 4 * S + 4 * N * S, name
        assert result["bytes_after_reduce"] == {"weights": weights, "gradients": 4 * S, "optimizer": 8 * S}
        # stage 2 launches every bucket during the last micro-batch's backward, stage 1 in reduce_gradients
        launched_at_last = result["buckets"] if stage == 2 else 0
        assert result["launched_in_backward"] == [0] * (GRAD_ACCUM - 1) + [launched_at_last], name
        assert all(r["grads_left"] == 0 for r in result["records"])
        owned = sorted(tuple(r) for rank_ranges in result["ranges"] for r in rank_ranges)
        assert owned[0][0] == 0 and owned[-1][1] == P and all(a[1] == b[0] for a, b in zip(owned, owned[1:]))
        assert result["moment_diff"] < moments, name  # merged slices = stage 0's moments (and step)
    assert ranks[0]["lora_s2"]["P"] < ranks[0]["s2"]["P"] / 10  # only the adapters (and the bias) are sharded


@pytest.mark.slow
def test_slices_saved_at_two_ranks_resume_at_three_and_one(tmp_path):
    """Save after 5 steps at np=2; continue at np=3 and np=1 from all slices; match the straight np=2 run."""
    saved = zero_job("reshard-save", str(tmp_path), np=2)
    three = zero_job("reshard-load", str(tmp_path), np=3)
    one = zero_job("reshard-load", str(tmp_path), np=0)
    for stage_index in range(2):
        straight = saved[0][stage_index]
        assert straight["resumed"] == straight["losses"][5:]  # same world size: bit-exact
        assert len({d for rank in saved for d in rank[stage_index]["digests"]}) == 1
        for job in (three, one):
            result = job[0][stage_index]
            assert result["losses"] == pytest.approx(straight["losses"][5:], rel=1e-5)
            # the control: the weights alone (fresh moments) do not give those losses
            assert result["fresh"] != pytest.approx(straight["losses"][5:], rel=1e-4)


@pytest.mark.slow
def test_bf16_master_weights():
    """bf16 weights with fp32 master slices train like fp32 (20 steps within 2%); bf16 gathers bit for bit."""
    ranks = zero_job("bf16", np=2)
    gathers = [rank[0] for rank in ranks]
    assert all(g["dtype"] == "torch.bfloat16" for g in gathers)
    assert all(g["gathered"] == gathers[0]["own"] + gathers[1]["own"] for g in gathers)
    assert gathers[0]["own"] != gathers[1]["own"]
    for result in ranks[0][1:]:
        assert len(result["bf16"]) == 20
        assert result["bf16"] == pytest.approx(result["fp32"], rel=0.02)
        assert result["bf16"] != result["fp32"]  # it really ran in bf16
        assert result["bf16"][-1] < result["bf16"][0] - 0.5  # and learned
        assert len({rank[result["stage"]]["digest"] for rank in ranks}) == 1
        assert result["master_dtype"] == "torch.float32" and result["own_slice_is_master"] and result["has_master"]
        S, P = result["shard"], result["P"]
        assert 0 <= S - math.ceil(P / 2) < result["buckets"]
        assert result["bytes"]["optimizer"] == 12 * S  # moments and master weights, fp32
        # bf16 weights, and the averaged gradients kept in bf16 too: ZeRO's 2 + (2 + 12) / N bytes per parameter
        assert result["grad_dtype"] == "torch.bfloat16"
        assert result["bytes"]["weights"] == 2 * P and result["bytes"]["gradients"] == 2 * S


@pytest.mark.slow
def test_bf16_gradients_accumulate_in_fp32():
    """grad_accum=4 with bf16 weights: the averaged slice is the fp32 sum of the micro-steps' bf16 gradients,
    averaged over the ranks and rounded to bf16 once, in every element, so within one bf16 rounding (2^-9
    relative) of it. Summed in bf16, as autograd sums bf16 param.grad, 40% of the elements came out different
    here, 2.4e-3 to 2.8e-3 off in norm (1.5e-3 to 1.7e-3 now). The fp32 accumulation buffers, whole until the
    last pass reduces them, are the planner's bytes."""
    ranks = zero_job("accum", np=2)
    for result in (r for rank in ranks for r in rank):
        assert result["grad_dtype"] == "torch.bfloat16" and result["elements"] > 0
        assert result["differing"] == 0 and result["relative_error"] <= 2**-9, result
        numels = result["numels"]
        counts = ParamCounts(total=sum(numels), matmul=0, numels=tuple(numels))
        planned = model_state_bytes(counts, result["stage"], 2, True, ACCUM, SMALL_BUCKETS)
        assert result["peak"] == planned
        S = planned["optimizer"] // 12  # the slice: fp32 moments and master weights
        assert planned["gradients"] == 2 * S + 4 * 2 * S  # bf16 slice, fp32 buckets padded to a multiple of N
        assert result["after_reduce"]["gradients"] == 2 * S  # no param.grad kept, the buffers freed
