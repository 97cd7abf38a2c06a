"""Devices without the hardware: GPU placement of a sweep's jobs and matmul precision, on faked GPUs."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.run import place_on_a_gpu
from lmlab.runtime.devices import place_sweep_job, resolve_matmul_precision, select_device


@pytest.fixture
def four_gpus(monkeypatch):
    """torch reports 4 compute-capability-9.0 GPUs (nothing is ever run on them here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = True


def test_a_sweeps_jobs_go_round_the_gpus():
    assert [place_sweep_job(job, 2) for job in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [place_sweep_job(job, 3) for job in range(4)] == [0, 1, 2, 0]
    assert place_sweep_job(5, 1) is None and place_sweep_job(5, 0) is None


def test_the_runner_places_each_job_unless_told_otherwise(four_gpus, compose_cfg, capsys):
    placed = []
    for job in range(6):
        cfg = compose_cfg(["device=cuda"])
        place_on_a_gpu(cfg, job, f"[job {job}] ")
        placed.append(cfg.device.index)
    assert placed == [0, 1, 2, 3, 0, 1] and "[job 5] on GPU 1" in capsys.readouterr().out
    pinned = compose_cfg(["device=cuda", "device.index=3"])
    place_on_a_gpu(pinned, 0)
    assert pinned.device.index == 3
    cpu = compose_cfg(["device=cpu"])
    place_on_a_gpu(cpu, 1)
    assert cpu.device.index is None


def test_a_gpu_index_and_tf32_on_gpus_that_have_it(four_gpus):
    assert select_device("auto", index=2, cpu_heap=None) == torch.device("cuda", 2)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with pytest.raises(ConfigError, match=r"device.index=4 but this machine has 4 GPU\(s\); give 0 to 3"):
        select_device("cuda", index=4)
    assert select_device("cuda", matmul_precision="highest") == torch.device("cuda")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def test_full_fp32_matmuls_on_a_cpu_and_on_older_gpus(monkeypatch):
    assert resolve_matmul_precision("auto", torch.device("cpu")) == "highest"
    assert resolve_matmul_precision("high", torch.device("cpu")) == "high"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: no TF32
    assert resolve_matmul_precision("auto", torch.device("cuda", 0)) == "highest"
