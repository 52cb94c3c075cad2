import os

# No model hub, ever: every model comes from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from ascendra.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def smollm2_model():
    from ascendra.models import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer_path(tiny_model):
    return tiny_model.path
