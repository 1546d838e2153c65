"""Hidden test of the distillation assignment (rejection sampling's filter): keep_trace keeps a
response iff it is well-formed and right, on grpo's adversarial battery of strings."""
import pytest

import distill
from test_grpo import BATTERY


@pytest.mark.points(2)
def test_keep_trace_is_format_and_accuracy_on_the_battery():
    wrong = [(text[:40], target) for text, target, acc, fmt in BATTERY
             if distill.keep_trace(text, target) != bool(acc and fmt)]
    assert not wrong, f"keep_trace must keep exactly the well-formed right answers: {wrong}"
