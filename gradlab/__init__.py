"""gradlab: see how gradients flow through plain, residual and skip CNNs.

The public API, re-exported lazily so that the report side (pandas, seaborn) can be
imported without importing torch, and torch users never import a plotting library:

    import gradlab
    model = gradlab.build_model("conv", depth=32)
    with gradlab.Recorder(model, optimizer=opt) as rec: ...
    run = gradlab.load_run("runs/conv-d32")
"""
from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    # torch side
    "BLOCKS": "models", "DeepCNN": "models", "ConvBlock": "models", "ResBlock": "models",
    "ResDownBlock": "models", "SkipBlock": "models", "build_model": "models",
    "count_parameters": "models",
    "ProbePoint": "probes", "Residual": "probes", "declare": "probes", "select_probes": "probes",
    "load_cifar10": "data", "make_splits": "data", "DeviceLoader": "data", "DataError": "data",
    "Recorder": "recorder", "RecordConfig": "recorder", "every": "recorder", "logspaced": "recorder",
    "TrainConfig": "train", "Trainer": "train", "Callback": "train", "train_run": "train",
    # the lessons: gradlab.shatter is the module, so its entry points are exported by these names
    "ShatterConfig": "shatter", "shatter_networks": "shatter", "shatter_runs": "shatter",
    "lesion_study": "lesion", "lesion_runs": "lesion",
    # the run directory (no torch)
    "load_run": "runs", "Run": "runs", "RunError": "runs", "load_sweep": "runs", "Sweep": "runs",
    "SweepGrid": "sweep", "run_sweep": "sweep", "expand": "sweep", "cell_status": "sweep",
}

_RENAMED = {"select_probes": "select", "shatter_networks": "shatter"}  # exported name -> the module's
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
