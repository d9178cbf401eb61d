"""hvd_llama/device.py: which CUDA device a rank uses, and TF32; checked on CPU with torch.cuda stubbed (issue 18).
launch/gpu_check.sh checks them on a GPU node."""
from types import SimpleNamespace

import pytest
import torch

from hvd_llama.cli import UserError
from hvd_llama.config import load_config
from hvd_llama.device import allow_tf32, cuda_device_index, gpu_uuid


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


def test_a_torch_without_device_uuids_is_not_compared(monkeypatch):
    """torch.cuda.get_device_properties has .uuid from torch 2.4; hvd_llama runs on 2.1 and later."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=1 << 30))
    assert gpu_uuid(0) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=f"GPU-{index}"))
    assert gpu_uuid(3) == "GPU-3"


@pytest.mark.parametrize("device, enabled, expected", [("cuda", True, ["high"]), ("cuda", False, ["highest"]),
                                                       ("cpu", True, [])])
def test_tf32_switch_sets_the_matmul_precision_on_cuda_only(monkeypatch, device, enabled, expected):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    allow_tf32(torch.device(device), enabled)
    assert calls == expected


def test_tf32_is_a_train_setting_on_by_default():
    assert load_config().train.tf32 is True
    assert load_config(overrides=["train.tf32=false"]).train.tf32 is False
