import pytest

from tests.hf_models import FAMILIES, cached_hf_model


@pytest.fixture(scope="session")
def hf_model_factory(tmp_path_factory):
    """``factory(family, seed=0) -> dir``: each tiny HF model is built once per session."""
    return lambda family, seed=0: cached_hf_model(family, tmp_path_factory, seed)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def hf_model_dir(family, hf_model_factory):
    return hf_model_factory(family)

