"""Defaults that models and stages share, spelled once (plain Python: importing this module is free).

The core models use them as their parameters' defaults; the stage options
(:mod:`dwiflow.tasks.stages`) use the same constants, so the command line, the recon specs and the
Python API cannot drift apart.
"""

# RUMBA-SD (Canales-Rodríguez et al. 2015; DIPY's RumbaSDModel defaults)
RUMBA_WM_RESPONSE = (1.7e-3, 0.2e-3, 0.2e-3)  # single-fibre tensor eigenvalues, mm²/s
RUMBA_GM_DIFFUSIVITY = 0.8e-3  # mm²/s
RUMBA_CSF_DIFFUSIVITY = 3.0e-3  # mm²/s

# SMT (Kaden et al. 2016)
SMT_LAMBDA_PAR_BOUNDS = (0.1e-3, 3.0e-3)  # mm²/s
FREE_WATER_DIFFUSIVITY = 3.0e-3  # mm²/s

# b=0 volumes: b-values at or below this (s/mm²): DIPY's default b0_threshold. MRtrix3's BZeroThreshold is 10 (its
# core/dwi/dwi.h); MRtrix3 3.0.3 leaves a volume of 10 < b <= 50 out of every shell with a warning, where it is a b=0
# volume here (and in MRtrix3 with -config BZeroThreshold 50)
B0_THRESHOLD = 50.0

# FOD peaks (MRtrix3 sh2peaks layout); 0.2 rather than MRtrix3's 0.1: see the README
PEAKS_NUMBER = 3
PEAKS_REL_THRESHOLD = 0.2
PEAKS_MIN_SEPARATION = 25.0  # degrees
