"""The model-repository extension through `tritonclient`: the index lists what is on disk and its
state, unload takes a model out of service (readiness and inference follow), load brings it back
and picks up a version added on disk while serving, and a broken model cannot be loaded."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from service.operations import latent_for_seed
from tests.serving import running_server


def z_input() -> tritonhttp.InferInput:
    tensor = tritonhttp.InferInput("z", [1, 64], "FP32")
    tensor.set_data_from_numpy(latent_for_seed(1, 64)[None], binary_data=True)
    return tensor


@pytest.fixture
def own_repository(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy


def test_unload_load_and_a_new_version_through_the_standard_client(own_repository):
    with running_server(own_repository, ready_requires="all") as server:
        triton = tritonhttp.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120)
        index = {row["name"]: row for row in triton.get_model_repository_index()}
        assert index["digits"]["state"] == "READY" and index["digits"]["version"] == "1"
        before = triton.infer("digits", [z_input()]).as_numpy("image")

        triton.unload_model("digits")
        assert not triton.is_model_ready("digits") and triton.is_server_ready()  # an unloaded model is not required
        with pytest.raises(InferenceServerException, match="unloaded"):
            triton.infer("digits", [z_input()])
        assert {row["name"]: row for row in triton.get_model_repository_index()}["digits"]["state"] == "UNAVAILABLE"
        assert triton.is_model_ready("cdigits")  # the others are untouched

        shutil.copytree(own_repository / "digits" / "1", own_repository / "digits" / "2")  # a new version arrives on disk
        triton.load_model("digits")
        assert triton.is_model_ready("digits") and triton.is_model_ready("digits", "2")
        assert triton.get_model_metadata("digits")["versions"] == ["1", "2"]
        after = triton.infer("digits", [z_input()], model_version="2").as_numpy("image")
        assert np.array_equal(before, after)  # the same weights under the new version
        with pytest.raises(InferenceServerException, match="no model 'nope'"):
            triton.load_model("nope")

        (own_repository / "digits" / "1" / "model.onnx").write_bytes(b"broken")
        (own_repository / "digits" / "2" / "model.onnx").write_bytes(b"broken")
        with pytest.raises(InferenceServerException, match="could not be loaded"):
            triton.load_model("digits")
        triton.close()
