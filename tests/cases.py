"""The small test vocabulary shared by the op's tests: 37 ids (a prime, so tensor-parallel
shards are uneven at TP 2, 3 and 4), ten digit tokens, a '.' (for float_level) at id 20."""
from ntl_deepspeed import NumberVocab

V = 37
DECIMAL_POINT_ID = 20
# where the digits 0..9 sit: spread over the vocab (on every shard at TP 2 and 3), all on the
# first shard, or only in the last ids
NUMBER_LAYOUTS = {"spread": (3, 7, 11, 14, 19, 23, 26, 30, 33, 36),
                  "first_shard": tuple(range(0, 10)),
                  "tail": tuple(range(V - 10, V))}
NUMBER_IDS = NUMBER_LAYOUTS["spread"]


def vocab37(layout: str = "spread") -> NumberVocab:
    """Tokens ``w<i>``, but the digits at ``NUMBER_LAYOUTS[layout]`` and '.' at id 20."""
    tokens = [f"w{i}" for i in range(V)]
    for digit, i in enumerate(NUMBER_LAYOUTS[layout]):
        tokens[i] = str(digit)
    tokens[DECIMAL_POINT_ID] = "."
    return NumberVocab.from_tokens(tokens)
