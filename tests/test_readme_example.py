"""The README's first example runs as written (on the CPU, over the tiny set)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_python_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


@pytest.mark.slow
def test_the_first_example_trains_a_step(tiny_set):
    pytest.importorskip("nvidia.dali")
    code = _first_python_block()
    for gpu, cpu in ((".cuda()", ""), ('"cuda"', '"cpu"'), ("resnet50()", f"resnet18(num_classes={tiny_set.num_classes})"),
                     ('"/data/imagenet/train"', repr(tiny_set.images)), ('"imagenet_relabel.h5"', repr(tiny_set.store)),
                     ("batch_size=256", "batch_size=8")):
        assert gpu in code, f"the example changed: {gpu!r} is gone; update this test"
        code = code.replace(gpu, cpu)
    code = code.replace("config=DataConfig(", "device='cpu', config=DataConfig(image_size=64, num_threads=1, ")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    loss = namespace["loss"]
    loss = loss.detach()
    assert loss.ndim == 0 and bool(loss.isfinite()) and float(loss) > 0
