"""``mmer serve`` as a user runs it: a process that prints its URL, answers the openai client, and
shuts down cleanly on SIGTERM (exit 0, Ray and Serve gone with it). Its slot budget holds no
model: it says so at start and still answers (the mask-native path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from ray_helpers import free_port, subprocess_env
from serve_helpers import TOKEN, TOKEN_ENV, build_store, image

from mmer_dist.media import parts as media_parts

pytestmark = pytest.mark.slow
MMER = Path(sys.executable).parent / "mmer"


def test_mmer_serve_answers_and_stops_on_sigterm(tmp_path):
    store, _ = build_store(tmp_path)
    port = free_port()
    proc = subprocess.Popen([str(MMER), "serve", "--store", store, "--port", str(port), "--api-token-env", TOKEN_ENV,
                             "--slot-budget", "1KB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(**{TOKEN_ENV: TOKEN}), start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("mmer serve exited early:\n" + "".join(lines))
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        assert any("every model is served through the mask-native path" in line for line in lines), lines
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="vision", temperature=0, max_tokens=4, messages=[
            {"role": "user", "content": [media_parts.image_part(image(0)), {"type": "text", "text": "what ?"}]}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 4
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "shutting down" in rest and "Traceback" not in rest


def test_replicas_reach_the_app_args():
    from argparse import ArgumentParser

    from mmer_dist.cli.serve import app_args, register

    parser = ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--store", "s", "--replicas", "3"])
    assert app_args(args)["replicas"] == 3
    assert "--replicas" in parser._subparsers._group_actions[0].choices["serve"].format_help()
