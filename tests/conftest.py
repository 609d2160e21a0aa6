import glob
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# values computed by ntloss 0.3.2 (a copy of shared/reference/ntloss_small_case.json)
SMALL_CASE = os.path.join(ROOT, "tests", "data", "ntloss_small_case.json")


@pytest.fixture(scope="session")
def small_case():
    import json

    with open(SMALL_CASE) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def mistral_model_path():
    import mistral_common

    hits = glob.glob(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                  "tokenizer.model.v1"))
    if not hits:
        pytest.fail("mistral-common does not ship data/tokenizer.model.v1 any more")
    return hits[0]
