"""`moecli profile`: probe this host, measure the expert kernels, fit the cost model, plan placement, write a profile.

probe.py      what the machine has (CPU, ISA, NUMA, RAM, GPUs)
microbench.py measured costs (CPU expert time vs tokens -> a·n + b + first-expert penalty; memory, PCIe, device)
plan.py       what goes where for a model and a context size, and the closest llama.cpp flags
store.py      profiles/<host>[-<model>].toml written atomically in the schema of profiles/README.md; find_profile()
"""
__all__ = ["NO_PROFILE_MESSAGE", "find_profile", "no_profile_message"]


def __getattr__(name):  # lazy: chat/bench import find_profile without loading the benchmarks
    if name in __all__:
        from moecli.profile import store

        return getattr(store, name)
    raise AttributeError(name)
