"""dali_relabel.devices: how DALI's source workers start."""
import pytest
import torch

pytest.importorskip("nvidia.dali")


@pytest.mark.parametrize("driver_initialized, requested, expected", [
    (True, "fork", "spawn"),  # forked workers would inherit a CUDA driver: DALI refuses to fork
    (False, "fork", "fork"),
    (True, "spawn", "spawn"),
    (False, "spawn", "spawn"),
])
def test_worker_start_method_follows_dalis_driver_check(monkeypatch, driver_initialized, requested, expected):
    # DALI's own check, not torch's: torch.cuda.is_available() initialises the driver without
    # making torch.cuda.is_initialized() true.
    import nvidia.dali.backend

    from dali_relabel.devices import worker_start_method

    monkeypatch.setattr(nvidia.dali.backend, "IsDriverInitialized", lambda: driver_initialized)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: not driver_initialized)
    assert worker_start_method(requested) == expected
