"""The TPU runner's list of step shapes is exactly the set a padded step can take (no
torch_xla needed: the runner imports it only in its hooks)."""
import pytest

from runners.plan import pad_to as pad
from runners.plan import power_of_two_buckets as _buckets
from runners.plan import step_shapes
from runners.tpu import MIN_REQ_BUCKET, MIN_TOKEN_BUCKET

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("max_tokens,max_reqs", [(32, 8), (128, 8), (100, 24), (64, 64), (16, 256), (8, 4)])
def test_step_shapes_are_exactly_the_reachable_padded_shapes(max_tokens: int, max_reqs: int) -> None:
    tb = _buckets(max_tokens, min(MIN_TOKEN_BUCKET, max_tokens))
    rb = _buckets(max_reqs, min(MIN_REQ_BUCKET, max_reqs))
    reachable = {(pad(n, tb), pad(k, rb), n == k)
                 for n in range(1, max_tokens + 1) for k in range(1, min(n, max_reqs) + 1)}
    shapes = step_shapes(tb, rb)
    got = [(pad(n, tb), pad(k, rb), decode) for n, k, decode in shapes]
    assert all((n == k) == decode and 1 <= k <= n <= max_tokens for n, k, decode in shapes)
    assert len(set(got)) == len(got) and set(got) == reachable
