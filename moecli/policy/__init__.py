"""Pure placement policies: cost model, intra-layer scheduling, caches, prefetch, named placements.
No torch, no ggml: the executor and the simulator drive the same objects."""
from moecli.policy.cache import BeladyCache, LFUCache, LRUCache, MRSCache, StaticCache
from moecli.policy.cost import CostModel, HostProfile, build_cost_model, load_profile
from moecli.policy.geometry import GEOMETRIES, ModelGeometry, get_geometry
from moecli.policy.placement import PLACEMENTS, Placement, get_placement
from moecli.policy.prefetch import ImpactPrefetcher, NoisyPredictor, Target
from moecli.policy.schedule import BruteForceScheduler, GreedyScheduler, OptimalScheduler, Plan, evaluate

__all__ = [n for n in dir() if not n.startswith("_")]
