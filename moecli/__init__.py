"""moecli: run large Mixture-of-Experts LLMs on one machine, experts scheduled between CPU and GPU per layer."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `moecli --help` should not pay for importing torch.
    if name in ("load", "Model", "Session"):
        from moecli import api

        return getattr(api, name)
    raise AttributeError(name)
