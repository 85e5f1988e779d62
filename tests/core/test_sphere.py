import numpy as np
import pytest

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.sphere import get_sphere, sphere_from_vertices


@pytest.mark.parametrize("name, count", [("ico362", 362), ("ico642", 642), ("ico2562", 2562), ("repulsion300", 300), ("repulsion724", 724)])
def test_named_spheres_are_symmetric_triangulations(name, count):
    s = get_sphere(name)
    v = s.vertices
    assert v.shape == (count, 3)
    assert np.allclose(np.linalg.norm(v, axis=1), 1)
    half = count // 2
    assert np.allclose(v[:half], -v[half:])  # antipodal pairs
    assert s.edges.shape[0] == 3 * count - 6  # Euler for a sphere triangulation
    degree = np.bincount(s.edges.ravel(), minlength=count)
    assert degree.min() >= 4 and degree.max() <= 8


@pytest.mark.parametrize("name", ["ico642", "repulsion724"])
def test_nearest_point_is_a_neighbour_and_spacing_is_even(name):
    s = get_sphere(name)
    v = s.vertices
    cos = v @ v.T
    np.fill_diagonal(cos, -2)
    nearest = cos.argmax(axis=1)
    for i in range(0, s.n_vertices, 37):
        assert nearest[i] in s.neighbours(i)
    angles = np.degrees(np.arccos(cos.max(axis=1)))
    assert angles.max() / angles.min() < 1.5


def test_bad_vertices_and_names():
    with pytest.raises(DwiflowInputError, match="zero vector"):
        sphere_from_vertices(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]))
    with pytest.raises(DwiflowInputError, match="unknown sphere"):
        get_sphere("nope")
