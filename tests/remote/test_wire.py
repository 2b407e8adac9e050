"""A request's wire form: what crosses is what the engine gets, and a bad one is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from model.remote.wire import WireError, request_from_json, request_to_json
from model.types import GenerationRequest, SamplingParams


def test_a_request_crosses_unchanged():
    melody = np.random.default_rng(1).random((40, 12)).astype(np.float32)
    r = GenerationRequest("dusty drums", 3.5, SamplingParams(guidance=4.0, temperature=0.9, top_k=50, seed=11),
                          melody=melody)
    back = request_from_json(request_to_json(r))
    assert (back.prompt, back.seconds, back.params, back.return_prompt) == (r.prompt, r.seconds, r.params, False)
    assert back.audio_prompt is None and np.array_equal(back.melody, melody) and back.melody.dtype == np.float32
    assert back.cancel is not r.cancel  # a cancel is the client closing the request, never shared state


@pytest.mark.parametrize("change,says", [
    ({"volume": 11}, "unknown field(s) volume"),
    ({"seconds": "4"}, "seconds must be a number"),
    ({"seconds": -1.0}, "request:"),
    ({"params": {"temperature": 99.0}}, "temperature"),
    ({"prompt": 7}, "prompt must be text"),
])
def test_a_bad_request_is_refused_by_name(change, says):
    d = request_to_json(GenerationRequest("drums", 2.0))
    d.update(change)
    with pytest.raises(WireError, match=says.replace("(", r"\(").replace(")", r"\)")):
        request_from_json(d)
