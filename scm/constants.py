"""The paper's sampling constants, importable without torch (the params loader checks against them)."""

# t_max = arctan(σ_max/σ_d) with EDM's σ_max = 80 (paper App. G.2).
SIGMA_MAX = 80.0
# 2-step sampling's intermediate time (paper §5.2).
T_MID = 1.1
