"""The linear matrix inequality that constrains DKI fits (Dela Haije et al. 2020), as DIPY 1.12 ships it.

``M(h, s) = sum_i h_i A_(i+1) + sum_j s_j A_(23+j)`` must be positive semidefinite, with ``h`` the 22 parameters of
the DKI log-signal model in DIPY's layout (:func:`dwiflow.core.dki.dki_design_matrix`: 6 diffusion-tensor elements,
15 kurtosis elements times MD², -log S0) and ``s`` 18 free variables; ``A_0`` is zero. The numbers are the data of
DIPY's ``dki_constraint.npz`` (``dipy.data.load_sdp_constraints("dki")``, the "full" convexity level): 41
symmetric 12x12 matrices, listed here as the upper-triangle entries (matrix, row, column, value) that are not zero.

Reference: Dela Haije T., Özarslan E., Feragen A. Enforcing necessary non-negativity constraints for common
diffusion MRI models using sum of squares programming. NeuroImage 209 (2020) 116405.
"""

SIZE = 12  # rows and columns of M
N_MATRICES = 41  # A_0 … A_40: 1 + 22 parameters + 18 free variables

ENTRIES = (
    (1, 0, 0, 2), (2, 0, 1, 2), (3, 1, 1, 2), (4, 0, 2, 2), (5, 1, 2, 2), (6, 2, 2, 2), (7, 3, 3, 2), (8, 7, 7, 2),
    (9, 11, 11, 2), (10, 3, 4, 2), (10, 3, 6, 2), (11, 3, 5, 2), (11, 3, 9, 2), (12, 4, 7, 2), (12, 6, 7, 2),
    (13, 7, 8, 2), (13, 7, 10, 2), (14, 5, 11, 2), (14, 9, 11, 2), (15, 8, 11, 2), (15, 10, 11, 2), (16, 3, 7, 2),
    (16, 4, 4, 2), (16, 4, 6, 2), (16, 6, 6, 2), (17, 3, 11, 2), (17, 5, 5, 2), (17, 5, 9, 2), (17, 9, 9, 2),
    (18, 7, 11, 2), (18, 8, 8, 2), (18, 8, 10, 2), (18, 10, 10, 2), (19, 3, 8, 2), (19, 3, 10, 2), (19, 4, 5, 2),
    (19, 4, 9, 2), (19, 5, 6, 2), (19, 6, 9, 2), (20, 4, 8, 2), (20, 4, 10, 2), (20, 5, 7, 2), (20, 6, 8, 2),
    (20, 6, 10, 2), (20, 7, 9, 2), (21, 4, 11, 2), (21, 5, 8, 2), (21, 5, 10, 2), (21, 6, 11, 2), (21, 8, 9, 2),
    (21, 9, 10, 2), (23, 3, 7, -1), (23, 4, 6, 1), (24, 3, 8, -1), (24, 5, 6, 1), (25, 4, 8, -1), (25, 5, 7, 1),
    (26, 3, 10, -1), (26, 4, 9, 1), (27, 3, 11, -1), (27, 5, 9, 1), (28, 4, 11, -1), (28, 5, 10, 1), (29, 6, 10, -1),
    (29, 7, 9, 1), (30, 6, 11, -1), (30, 8, 9, 1), (31, 7, 11, -1), (31, 8, 10, 1), (32, 0, 4, -1), (32, 1, 3, 1),
    (33, 0, 5, -1), (33, 2, 3, 1), (34, 1, 5, -1), (34, 2, 4, 1), (35, 0, 7, -1), (35, 1, 6, 1), (36, 0, 8, -1),
    (36, 2, 6, 1), (37, 1, 8, -1), (37, 2, 7, 1), (38, 0, 10, -1), (38, 1, 9, 1), (39, 0, 11, -1), (39, 2, 9, 1),
    (40, 1, 11, -1), (40, 2, 10, 1),
)
