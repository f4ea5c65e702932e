"""The DALI plugin: its C++/CUDA operators (``csrc/``), how it is built and loaded, and the
reference they are tested against.

* :mod:`.plugin_build`: compile ``csrc/`` against the DALI installed in this Python;
* :mod:`.plugin`: find, check, build if needed, and load the plugin (``fn.relabel.*``);
* :mod:`.fused`: run the fused label-pooling operator on in-memory batches;
* :mod:`.reference`: the ReLabel authors' LabelPooling in plain PyTorch (the test oracle).
"""
