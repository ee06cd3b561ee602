"""The RKSC extensions: the tree cache with ASKS, RSBCM eviction, compression, CGEE, branch stop.

==================  ==========================================================================
module              holds
==================  ==========================================================================
``asks_config``     :class:`ASKSConfig`: ASKS settings, validated once (no SGLang import)
``tree_cache``      :class:`RKSCRadixCache` (SGLang's ``RadixCache`` + semantic keys and the
                    ASKS search); the same class serves the engine and the runtime
``semantic_match``  what an ASKS lookup returns (``SemanticMatch``) and token alignment
``span_keys``       a recipient's span keyed above layer 0 (scratch forward, engine only)
``rsbcm``           the ``rsbcm`` eviction strategy (attention-weighted, depth priority)
``compression``     decode-KV compression of reasoning traces (R-KV, CASK-style, baselines)
                    and the step that applies it to a request's row
``cgee``            :func:`verify`: best-of-N with confidence-gated early exit, and its audit
``cgee_decisions``  CGEE's model-free decisions: confidence, vote, gate 1, the choice
``verifier``        the verifier's YES/NO pass and its layer-exit policy
``branch_stop``     :func:`vote`: stop a fork's branches once the vote is settled;
                    :func:`vote_waves`: launch them in waves while it is not
==================  ==========================================================================
"""
