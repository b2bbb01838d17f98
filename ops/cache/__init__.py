"""Training-free step caching: `cache(bundle, CacheConfig) -> (bundle, CacheReport)` calibrates a method
(calibrate.py) among CACHE_METHODS (methods.py, one module each); the policy and how a sampler applies it
(policy.py); what the methods share (stack.py)."""
from __future__ import annotations

from .calibrate import CacheConfig, CacheReport, cache
from .methods import CACHE_METHODS, METHOD_CHOICES
from .policy import BlockCache, CachePolicy, MethodPolicy, bundle_policy, cached_predict, predictor_for

__all__ = ["BlockCache", "CACHE_METHODS", "CacheConfig", "CachePolicy", "CacheReport", "METHOD_CHOICES",
           "MethodPolicy", "bundle_policy", "cache", "cached_predict", "predictor_for"]
