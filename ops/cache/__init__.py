"""Training-free step caching: `cache(bundle, CacheConfig) -> (bundle, CacheReport)` calibrates a policy
(calibrate.py); the policy and how a sampler applies it (policy.py)."""
from __future__ import annotations

from .calibrate import CacheConfig, CacheReport, cache
from .policy import BlockCache, CachePolicy, bundle_policy, cached_predict, predictor_for

__all__ = ["BlockCache", "CacheConfig", "CachePolicy", "CacheReport", "bundle_policy", "cache", "cached_predict",
           "predictor_for"]
