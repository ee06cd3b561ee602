"""The RKSC extensions: the tree cache with ASKS, RSBCM eviction, compression, CGEE, branch stop.

================  ============================================================================
module            holds
================  ============================================================================
``tree_cache``    :class:`RKSCRadixCache` (SGLang's ``RadixCache`` + semantic keys) and
                  :class:`ASKSConfig`; the same class serves the engine and the runtime
``rsbcm``         the ``rsbcm`` eviction strategy (attention-weighted, depth priority)
``compression``   decode-KV compression of reasoning traces (R-KV, CASK-style, baselines)
``cgee``          :func:`verify`: best-of-N with confidence-gated early exit
``verifier``      the verifier's YES/NO pass and its layer-exit policy
``branch_stop``   :func:`vote`: stop a fork's branches once the vote is settled
================  ============================================================================
"""
