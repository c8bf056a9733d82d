"""platforms.triton_support: Hopper features only on a CUDA device with compiled kernels, PDL off by env."""
import torch

from platforms import triton_support as ts


def test_no_hopper_features_off_cuda_or_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(ts, "compute_capability", lambda: 90)
    assert not ts.hopper_or_newer(torch.device("cpu")) and not ts.launch_pdl(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not ts.hopper_or_newer(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ts.hopper_or_newer(torch.device("cuda")) and ts.launch_pdl(torch.device("cuda"))


def test_capability_decides_and_env_turns_pdl_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    for cc, hopper in ((80, False), (89, False), (90, True), (100, True), (None, False)):
        monkeypatch.setattr(ts, "compute_capability", lambda cc=cc: cc)
        monkeypatch.delenv(ts.PDL_ENV_VAR, raising=False)
        assert ts.hopper_or_newer(cuda) == hopper and ts.launch_pdl(cuda) == hopper
        monkeypatch.setenv(ts.PDL_ENV_VAR, "0")
        assert ts.hopper_or_newer(cuda) == hopper and not ts.launch_pdl(cuda)


def test_capability_is_none_without_an_nvidia_gpu():
    if torch.cuda.is_available():
        assert ts.compute_capability() is None or ts.compute_capability() >= 50
    else:
        assert ts.compute_capability() is None
