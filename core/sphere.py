"""Antipodally symmetric point sets on the unit sphere with their neighbour graph.

Two constructions: geodesic subdivision of the icosahedron (10·ν²+2 points for
frequency ν: 362 for ν=6, 642 for ν=8, 2562 for ν=16) and electrostatic repulsion of
antipodal pairs (Jones et al. 1999), which is what MRtrix3 and DIPY ship. Neighbours
come from a triangulation: the subdivision's for geodesic spheres, the convex hull for others.

References
----------
Jones D.K., Horsfield M.A., Simmons A. Optimal strategies for measuring diffusion in
anisotropic systems by magnetic resonance imaging. Magn Reson Med 42 (1999) 515-525.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from dwiflow.core.errors import DwiflowInputError


@dataclass(frozen=True)
class Sphere:
    """Unit vectors with a triangulation.

    Attributes
    ----------
    vertices : ndarray, shape (n, 3)
        Unit vectors; for a symmetric sphere vertex ``i + n/2`` is ``-vertex i``.
    faces : ndarray, shape (f, 3)
        Triangles (vertex indices) of the convex hull.
    edges : ndarray, shape (e, 2)
        Unique undirected edges (i < j) of the triangulation: the neighbour graph.
    """

    vertices: np.ndarray
    faces: np.ndarray
    edges: np.ndarray = field(repr=False)

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    def neighbours(self, index: int) -> np.ndarray:
        """Indices of the vertices joined to ``index`` by an edge."""
        e = self.edges
        return np.sort(np.concatenate([e[e[:, 0] == index, 1], e[e[:, 1] == index, 0]]))

    @property
    def hemisphere(self) -> np.ndarray:
        """The first half of the vertices (one of each antipodal pair) of a symmetric sphere."""
        return self.vertices[: self.n_vertices // 2]


def sphere_from_vertices(vertices: np.ndarray) -> Sphere:
    """Triangulate unit vectors (convex hull) and build a :class:`Sphere`."""
    v = np.asarray(vertices, dtype=float)
    if v.ndim != 2 or v.shape[1] != 3 or v.shape[0] < 4:
        raise DwiflowInputError(f"sphere vertices must be an (n>=4, 3) array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    if np.any(norms < 1e-9):
        raise DwiflowInputError("sphere vertices contain a zero vector")
    v = v / norms[:, None]
    from scipy.spatial import ConvexHull  # imported here: it costs 0.4 s, and most commands never triangulate

    faces = ConvexHull(v).simplices.astype(np.intp)
    return Sphere(v, faces, _edges_of(faces))


def _edges_of(faces: np.ndarray) -> np.ndarray:
    """The unique undirected edges (i < j, sorted) of a triangulation."""
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [0, 2]]]).astype(np.int64)
    pairs.sort(axis=1)
    codes = np.unique(pairs[:, 0] * (int(pairs.max()) + 1) + pairs[:, 1])  # one integer per edge: sorts as (i, j)
    return np.stack(np.divmod(codes, int(pairs.max()) + 1), axis=1).astype(np.intp)


def symmetric_sphere(hemisphere: np.ndarray) -> Sphere:
    """Sphere made of ``hemisphere`` followed by its antipodes."""
    h = np.asarray(hemisphere, dtype=float)
    return sphere_from_vertices(np.concatenate([h, -h]))


# the 20 faces of the icosahedron below (its convex hull), as vertex indices
_ICOSAHEDRON_FACES = np.array(
    [[0, 1, 5], [0, 1, 7], [0, 5, 11], [0, 7, 10], [0, 10, 11], [1, 5, 9], [1, 7, 8], [1, 8, 9], [2, 3, 4], [2, 3, 6],
     [2, 4, 11], [2, 6, 10], [2, 10, 11], [3, 4, 9], [3, 6, 8], [3, 8, 9], [4, 5, 9], [4, 5, 11], [6, 7, 8],
     [6, 7, 10]], dtype=np.intp)


def _icosahedron() -> tuple[np.ndarray, np.ndarray]:
    t = (1 + np.sqrt(5)) / 2
    v = np.array(
        [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
         [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
        dtype=float,
    )
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, _ICOSAHEDRON_FACES


def _hemisphere_of(points: np.ndarray) -> np.ndarray:
    """One point of each antipodal pair (the one with positive z, then y, then x)."""
    key = np.where(np.abs(points[:, 2]) > 1e-9, points[:, 2],
                   np.where(np.abs(points[:, 1]) > 1e-9, points[:, 1], points[:, 0]))
    return points[key > 0]


@lru_cache(maxsize=16)
def geodesic_sphere(frequency: int) -> Sphere:
    """Icosahedral geodesic sphere of frequency ν: 10ν²+2 symmetric points.

    Every icosahedron face is divided into ν² triangles and the new points are
    projected onto the sphere. The vertex order is a hemisphere then its antipodes.
    The faces are those of the subdivision (for these points the same triangulation
    as their convex hull, which is not computed: it costs a SciPy import and a hull).
    """
    if int(frequency) != frequency or frequency < 1:
        raise DwiflowInputError(f"frequency must be a positive integer, got {frequency!r}")
    frequency = int(frequency)
    v, faces = _icosahedron()
    ij = np.array([(i, j) for i in range(frequency + 1) for j in range(frequency + 1 - i)])
    local = {(int(i), int(j)): n for n, (i, j) in enumerate(ij)}
    triangles = []
    for i in range(frequency):
        for j in range(frequency - i):
            triangles.append((local[i, j], local[i + 1, j], local[i, j + 1]))
            if i + j < frequency - 1:
                triangles.append((local[i + 1, j], local[i + 1, j + 1], local[i, j + 1]))
    w = np.column_stack([ij[:, 0], ij[:, 1], frequency - ij[:, 0] - ij[:, 1]]) / frequency
    pts = np.einsum("pk,fkd->fpd", w, v[faces]).reshape(-1, 3)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    points, point_of = np.unique(np.round(pts, 12), axis=0, return_inverse=True)
    hemi = _hemisphere_of(points)
    # each point's index in [hemi, -hemi] (rounding is symmetric, so an antipode is found exactly; tuples make
    # -0.0 and 0.0 the same key)
    in_hemi = {tuple(p): n for n, p in enumerate(hemi.tolist())}
    order = np.array([in_hemi[p] if p in in_hemi else hemi.shape[0] + in_hemi[tuple(-x for x in p)]
                      for p in map(tuple, points.tolist())], dtype=np.intp)
    local_faces = np.arange(faces.shape[0])[:, None, None] * ij.shape[0] + np.array(triangles)[None]
    sphere_faces = order[point_of.reshape(-1)[local_faces.reshape(-1, 3)]]
    full = np.concatenate([hemi, -hemi])
    return Sphere(full / np.linalg.norm(full, axis=1, keepdims=True), sphere_faces, _edges_of(sphere_faces))


@lru_cache(maxsize=16)
def repulsion_sphere(n_hemisphere: int, iterations: int = 150, seed: int = 1) -> Sphere:
    """Symmetric sphere of ``2 * n_hemisphere`` points spread by electrostatic repulsion.

    Each direction repels every other direction and their antipodes (Jones et al. 1999);
    the energy is minimised by projected gradient steps from a Fibonacci start, which
    makes the result deterministic.
    """
    if int(n_hemisphere) != n_hemisphere or n_hemisphere < 3:
        raise DwiflowInputError(f"n_hemisphere must be an integer >= 3, got {n_hemisphere!r}")
    n = int(n_hemisphere)
    rng = np.random.default_rng(seed)
    k = np.arange(n) + 0.5
    z = 1 - k / n  # upper hemisphere
    az = np.pi * (1 + np.sqrt(5)) * k
    r = np.sqrt(1 - z**2)
    x = np.column_stack([r * np.cos(az), r * np.sin(az), z]) + 1e-3 * rng.standard_normal((n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    spacing = np.sqrt(2 * np.pi / n)  # typical nearest-neighbour distance
    for it in range(iterations):
        step = 0.1 * spacing * (1.0 - it / iterations)
        force = np.zeros_like(x)
        for sgn in (1.0, -1.0):
            diff = x[:, None, :] - sgn * x[None, :, :]
            d2 = np.einsum("ijk,ijk->ij", diff, diff)
            np.fill_diagonal(d2, np.inf)
            force += np.einsum("ij,ijk->ik", d2**-1.5, diff)
        force -= np.einsum("ij,ij->i", force, x)[:, None] * x
        x = x + step * force / max(float(np.linalg.norm(force, axis=1).max()), 1e-12)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.where(x[:, 2:3] < 0, -x, x)
    return symmetric_sphere(x)


SPHERES = {
    "ico362": lambda: geodesic_sphere(6),
    "ico642": lambda: geodesic_sphere(8),
    "ico2562": lambda: geodesic_sphere(16),
    "ico10242": lambda: geodesic_sphere(32),
    "repulsion300": lambda: repulsion_sphere(150),
    "repulsion724": lambda: repulsion_sphere(362),
}
"""Named spheres: ~300 and ~700 points for fits and constraints, dense ones for peak search."""


def get_sphere(name: str) -> Sphere:
    """A named sphere from :data:`SPHERES` (cached)."""
    try:
        return SPHERES[name]()
    except KeyError:
        raise DwiflowInputError(f"unknown sphere {name!r}; choose one of {sorted(SPHERES)}") from None


def sphere_vertices(sphere: str | Sphere | np.ndarray) -> np.ndarray:
    """Unit vectors (m, 3) of a sphere given by name, as a :class:`Sphere` (or DIPY's) or as an array."""
    if isinstance(sphere, str):
        return get_sphere(sphere).vertices
    if isinstance(sphere, Sphere) or hasattr(sphere, "vertices"):  # ours, or DIPY's (dipy.core.sphere.Sphere)
        sphere = sphere.vertices
    vertices = np.asarray(sphere, dtype=float)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] < 3:
        raise DwiflowInputError(f"sphere must be a name, a Sphere or (m, 3) unit vectors, got shape {vertices.shape}",
                                parameters=("sphere",))
    return vertices / np.linalg.norm(vertices, axis=1, keepdims=True)
