"""build_step_inputs: the one host-side step builder the eager path and both graph kinds read."""
from engine import SamplingParams
from engine.sequence import Sequence
from engine.step_inputs import NO_SLOT, build_step_inputs


def _seq(i: int, prompt: list[int], computed: int, table: list[int], slot: int | None = None) -> Sequence:
    seq = Sequence(i, f"r{i}", prompt, SamplingParams(max_tokens=4))
    seq.num_computed_tokens, seq.block_table, seq.lora_slot = computed, table, slot
    return seq


def test_a_mixed_step_lists_each_token_and_each_sequence_in_schedule_order():
    decode = _seq(0, [5, 6, 7, 8, 9], 4, [3, 1], slot=2)  # block size 4: its 5th token is block 1, row 0
    chunk = _seq(1, list(range(20, 30)), 0, [7, 8, 9])  # a first chunk of 6 of its 10 prompt tokens
    inputs = build_step_inputs([(decode, 1), (chunk, 6)], block_size=4)
    assert inputs.input_ids == [9, 20, 21, 22, 23, 24, 25]
    assert inputs.positions == [4, 0, 1, 2, 3, 4, 5]
    assert inputs.slot_mapping == [1 * 4 + 0, 28, 29, 30, 31, 32, 33]
    assert inputs.lora_slots == [2] + [NO_SLOT] * 6
    assert inputs.query_lens == [1, 6] and inputs.context_lens == [5, 6] and inputs.max_context_len == 6
    assert inputs.block_tables == [[3, 1], [7, 8, 9]]
    assert inputs.sample_rows == [0]  # the chunk does not end its prompt: nothing of it samples
    assert inputs.num_decodes == 1


def test_a_step_without_adapters_has_no_lora_slots_and_a_finished_prompt_samples_its_last_token():
    seqs = [_seq(0, [1, 2, 3], 0, [0]), _seq(1, [4, 5], 0, [1])]
    inputs = build_step_inputs([(seqs[0], 3), (seqs[1], 2)], block_size=4)
    assert inputs.lora_slots is None
    assert inputs.sample_rows == [2, 4]
    assert inputs.num_decodes == 0


def test_token_ids_read_prompt_then_outputs_then_placeholders_for_pending_tokens():
    seq = _seq(0, [10, 11, 12], 0, [])
    seq.output_token_ids, seq.num_pending = [13, 14], 2  # two more sampled, not read back yet
    everything = [10, 11, 12, 13, 14, 0, 0]
    for start in range(7):
        for end in range(start, 8):
            assert seq.token_ids(start, end) == everything[start:end]
