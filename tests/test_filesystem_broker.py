"""The embedded filesystem broker shared by several processes: no message read half-written, lost or taken twice.

kombu's own filesystem transport failed this (a consumer took a message file before its producer had written it,
read it empty and died on the JSON error: 3 of 3 runs of the concurrent test below; CI lost an
SR delivery worker so). :mod:`worker.filesystem_broker` writes whole files and takes them by rename."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from queue import Empty

import pytest

from config import Settings
from worker.celery_app import CLASSIFY_SERIES, INFERENCE_QUEUE, create_celery_app
from worker.filesystem_broker import Transport

PRODUCERS = 4
MESSAGES_EACH = 500
CONSUMERS = 3


def _produce(data_dir: str, producer: int) -> None:
    app = create_celery_app(Settings(data_dir=data_dir))
    # Celery's real messages, padded to an SR delivery's size so a write takes a while.
    for number in range(MESSAGES_EACH):
        app.send_task(CLASSIFY_SERIES, args=[producer, number, "x" * 4000], queue=INFERENCE_QUEUE)


def _consume(data_dir: str, results: multiprocessing.Queue, idle_seconds: float) -> None:
    taken: list[tuple[int, int]] = []
    error = None
    try:
        app = create_celery_app(Settings(data_dir=data_dir))
        with app.connection_for_read() as connection:
            queue = connection.SimpleQueue(INFERENCE_QUEUE)
            last = time.monotonic()
            while time.monotonic() - last < idle_seconds:
                try:
                    message = queue.get_nowait()
                except Empty:
                    time.sleep(0.001)
                    continue
                producer, number, _padding = message.payload[0]
                taken.append((producer, number))
                message.ack()
                last = time.monotonic()
    except Exception as exc:  # reported to the test, which fails on it
        error = repr(exc)
    results.put((taken, error))


def test_the_embedded_app_uses_the_whole_file_transport(tmp_path: Path) -> None:
    app = create_celery_app(Settings(data_dir=tmp_path))
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)


def test_concurrent_producers_and_consumers_lose_and_repeat_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    consumers = [context.Process(target=_consume, args=(str(tmp_path), results, 3.0)) for _ in range(CONSUMERS)]
    for process in consumers:
        process.start()
    producers = [context.Process(target=_produce, args=(str(tmp_path), n)) for n in range(PRODUCERS)]
    for process in producers:
        process.start()
    for process in producers:
        process.join(120)
        assert process.exitcode == 0
    reports = [results.get(timeout=120) for _ in consumers]
    for process in consumers:
        process.join(10)

    assert [error for _, error in reports if error] == []
    taken = [item for items, _ in reports for item in items]
    assert len(taken) == len(set(taken)), "a message was taken twice"
    assert sorted(taken) == [(p, n) for p in range(PRODUCERS) for n in range(MESSAGES_EACH)]
    broker = Settings(data_dir=tmp_path).broker_dir
    assert list((broker / "queue").iterdir()) == []
    assert list((broker / "taken").iterdir()) == []
    assert list((broker / "rejected").iterdir()) == []


def test_an_undecodable_message_is_kept_aside_and_the_next_one_delivered(tmp_path: Path, caplog) -> None:
    app = create_celery_app(Settings(data_dir=tmp_path))
    queue_folder = Settings(data_dir=tmp_path).broker_dir / "queue"
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue(INFERENCE_QUEUE)
        # An older name sorts first: the broken file is met before the good message.
        (queue_folder / f"1_broken.{INFERENCE_QUEUE}.msg").write_bytes(b"")
        queue.put({"job": 7})
        message = queue.get_nowait()
        assert message.payload == {"job": 7}
        message.ack()
        with pytest.raises(Empty):
            queue.get_nowait()
    rejected = Settings(data_dir=tmp_path).broker_dir / "rejected"
    assert [path.name for path in rejected.iterdir()] == [f"1_broken.{INFERENCE_QUEUE}.msg"]
    assert "could not be decoded" in caplog.text


def test_each_broker_folder_in_one_process_routes_its_own_messages(tmp_path: Path) -> None:
    # kombu remembered bindings once per process: the second folder got no exchange table and its message went to
    # kombu's dead-letter queue.
    for name in ("first", "second"):
        app = create_celery_app(Settings(data_dir=tmp_path / name))
        with app.connection_for_write() as connection:
            queue = connection.SimpleQueue(INFERENCE_QUEUE)
            queue.put({"folder": name})
            message = queue.get_nowait()
            assert message.payload == {"folder": name}
            message.ack()
