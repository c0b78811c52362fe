"""The normswap study: each claim of Ren et al. 2017 and Hoffer et al. 2018 measured at
small scale on real data with normswap's public API. ``python -m scripts.study.run --help``."""
