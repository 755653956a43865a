"""`flaminko serve --ray`: the same OpenAI app as replicas on Ray Serve, on a local Ray instance of this
machine (2 CPUs, half a CPU per replica, no GPU asked for, so it runs alike where there are GPUs). Two
replicas share the requests, each naming itself in `x-flaminko-replica`, and every greedy answer,
streamed or not, is generate's alone. A replica whose process is killed mid-run is replaced by Ray;
the clients whose requests it held retry (after a 5xx or a dropped connection, as the openai client
does) and get their answers, and the new replica answers later requests. Serve and the Ray instance
are shut down at the end, so nothing is left running."""

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from test_distributed import free_port  # noqa: E402
from test_serve_continuous import NAME, client_of, conversation, folder, openai, reference, served  # noqa: E402,F401  (fixtures)

from flaminko.serving.ray_deployment import APP_NAME, deployment, launch  # noqa: E402

SHORT, LONG = 8, 128


@pytest.fixture(scope="module")
def url(folder):  # noqa: F811
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        application = deployment(
            str(folder), replicas=2, replica_cpus=0.5, served_model_name=NAME, max_batch_size=4, max_total_tokens=LONG + 64
        )
        yield launch(application, port=free_port())
    finally:
        serve.shutdown()
        ray.shutdown()


def ask(client, case: int, tokens: int) -> tuple[str, str, int]:
    """The greedy answer to conversation `case`, the replica that gave it and the retries it took."""
    messages, _ = conversation(case)
    response = client.chat.completions.with_raw_response.create(model=NAME, messages=messages, max_tokens=tokens, temperature=0)
    return response.parse().choices[0].message.content, response.headers["x-flaminko-replica"], response.retries_taken


def together(client, cases: list[int], tokens: int) -> list[tuple[str, str, int]]:
    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(lambda case: ask(client, case, tokens), cases))


def replica_pids() -> list[int]:
    """The replicas' processes, by the title Ray gives them (`ray::ServeReplica:APP:DEPLOYMENT`)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in listing.splitlines() if f"ServeReplica:{APP_NAME}:" in line]


def test_two_replicas_share_the_requests_and_answer_as_generate_alone(url, served):  # noqa: F811
    cases = list(range(12))
    expected = [reference(served, case, SHORT, do_sample=False) for case in cases]
    client = client_of(url)
    answers = together(client, cases, SHORT)
    assert [text for text, _, _ in answers] == expected
    assert len({replica for _, replica, _ in answers}) == 2
    assert len(set(expected)) > 6  # the requests differ, so a mixed-up answer would show
    messages, _ = conversation(3)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=SHORT, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected[3]


def test_a_killed_replica_is_replaced_and_the_requests_it_held_are_answered_when_retried(url, served):  # noqa: F811
    first = {replica for _, replica, _ in together(client_of(url), list(range(8)), SHORT)}
    assert len(first) == 2
    cases = list(range(20, 28))
    expected = dict(zip(cases, [reference(served, case, LONG, do_sample=False) for case in cases]))
    pids = replica_pids()
    assert len(pids) == 2
    answers = under_load_while(lambda: os.kill(pids[0], signal.SIGKILL), url, cases)
    assert all(text == expected[case] for case, text, _, _ in answers)
    assert any(retries for _, _, _, retries in answers)  # some were held by the killed replica
    deadline = time.monotonic() + 180
    while not (pids[0] not in replica_pids() and len(replica_pids()) == 2 and running_replicas() == 2):
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(0.5)
    later = together(client_of(url), list(range(40, 48)), SHORT)
    assert [text for text, _, _ in later] == [reference(served, case, SHORT, do_sample=False) for case in range(40, 48)]
    assert {replica for _, replica, _ in later} - first  # the new replica answers too


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--replicas", "2", "--max-replicas", "1"], "--max-replicas must be an integer of at least --replicas (2), got 1"),
        (["--replicas", "0"], "--replicas must be an integer of at least 1, got 0"),
        (["--replica-gpus", "-1"], "--replica-gpus must be a number of at least 0, got -1.0"),
    ],
)
def test_cli_errors_are_one_line_before_ray_starts(folder, capsys, arguments, message):  # noqa: F811
    from flaminko.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(folder), "--ray", *arguments])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"flaminko serve: error: {message}"]


def under_load_while(action, url: str, cases: list[int], clients: int = 8, after: int = 16) -> list[tuple[int, str, str, int]]:
    """Keeps `clients` clients sending the cases back to back (retrying as the openai client does), runs
    `action` once both replicas have answered, and stops once `after` more answers came: as every client
    always has a request in flight, the action meets requests on both replicas, however fast they are.
    Returns (case, answer, replica, retries) for every request."""
    retrying = openai.OpenAI(base_url=url, api_key="none", max_retries=5, timeout=600)
    answers, stop = [], threading.Event()

    def client(first: int) -> None:
        index = first
        while not stop.is_set():
            case = cases[index % len(cases)]
            answers.append((case, *ask(retrying, case, LONG)))
            index += clients

    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(client, first) for first in range(clients)]
        deadline = time.monotonic() + 120
        while len({replica for _, _, replica, _ in answers}) < 2:
            assert time.monotonic() < deadline and not any(loop.done() for loop in running), "both replicas did not answer"
            time.sleep(0.05)
        action()
        done = len(answers)
        while len(answers) < done + after and not any(loop.done() for loop in running):
            time.sleep(0.05)
        stop.set()
        for loop in running:
            loop.result()
    return answers


def running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments[APP_NAME].replica_states.get("RUNNING", 0)
