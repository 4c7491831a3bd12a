"""The trainer: accelerate launch, DeepSpeed ZeRO for every network, model plugins.

From Python: `from pipeline import load_model, to_pil` (pipeline/model.py)."""

API = ("load_model", "to_pil", "Model")


def __getattr__(name: str):
    # imported on first use: `python -m pipeline.train` and the CLI need none of it
    if name in API:
        from pipeline import model

        return getattr(model, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
