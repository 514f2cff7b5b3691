"""The runtime worker's pipe is one conversation: a server thread tokenizing the next request
while another streams a generation must wait its turn, not interleave its request into the
generation's replies (each would read the other's answer, or hang)."""

from __future__ import annotations

import threading

from conftest import stand_in_runner
from toolkit.runner.core import Sampling
from toolkit.runner.worker import WorkerSession, rpc_command

SLOW_RT = '''
import time


class Session:
    eos_token_ids = (0,)
    context_length = 1024

    def tokenize(self, text, add_special_tokens=True):
        return [len(text)]

    def detokenize(self, ids):
        return ",".join(map(str, ids))

    def render_chat(self, messages):
        return "".join(m["content"] for m in messages)

    def generate(self, ids, sampling):
        for i in range(sampling.max_new_tokens):
            time.sleep(0.01)
            yield 100 + i

    def info(self):
        return {"runtime": "slow stand-in"}


def open_session(model_dir, options):
    return Session()
'''


def test_calls_from_other_threads_wait_for_a_generation(tmp_path):
    runner = stand_in_runner(tmp_path, "slow_rt", SLOW_RT)
    session = WorkerSession(rpc_command(runner=runner, module="slow_rt", model_dir=tmp_path),
                            label="slow_rt")
    try:
        results, errors = [], []

        def tokenize_many():
            try:
                for n in range(40):
                    results.append(session.tokenize("x" * n) == [n])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        thread = threading.Thread(target=tokenize_many)
        tokens = []
        for token in session.generate([1, 2], Sampling(max_new_tokens=20)):
            if len(tokens) == 1:
                thread.start()
            tokens.append(token)
            assert session.detokenize([token]) == str(token)  # this thread's own call re-enters
        thread.join(timeout=60)
        assert not thread.is_alive() and not errors, errors
        assert tokens == list(range(100, 120)) and results == [True] * 40
    finally:
        session.close()
