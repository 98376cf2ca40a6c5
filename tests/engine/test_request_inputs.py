"""InputProcessor.make_sequence: token ids a request names outside the vocabulary are refused
with the field at fault (vLLM's 400), not dropped."""
import pytest

from engine.errors import InvalidRequestError
from engine.inputs import InputProcessor
from engine.sampling_params import SamplingParams
from engine.tiny_model import make_tokenizer


@pytest.fixture
def inputs(tmp_path):
    tok = make_tokenizer(tmp_path)
    return InputProcessor(tok, len(tok), 64, True, (tok.eos_token_id,))


@pytest.mark.parametrize("field, params", [
    ("logit_bias", SamplingParams(logit_bias={3: 1.0, 10 ** 7: 5.0})),
    ("stop_token_ids", SamplingParams(stop_token_ids=[3, 10 ** 7])),
])
def test_token_ids_past_the_vocabulary_are_refused_naming_their_field(inputs, field, params):
    with pytest.raises(InvalidRequestError, match=f"{field} has token ids \\[10000000\\] outside") as refused:
        inputs.make_sequence("r", "hello", params)
    assert refused.value.param == field


def test_the_last_token_id_of_the_vocabulary_is_taken(inputs):
    last = inputs.vocab_size - 1
    seq = inputs.make_sequence("r", "hello", SamplingParams(logit_bias={last: 1.0}, stop_token_ids=[last]))
    assert seq.params.logit_bias == {last: 1.0} and seq.params.stop_token_ids == (last,)
