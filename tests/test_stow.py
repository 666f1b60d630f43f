"""STOW-RS intake (issue 19): ``serve`` takes a series from dicomweb-client and classifies it; a body mixing valid
and bad parts stores the valid ones and fails each bad one with its DICOM reason; no token or a wrong one is 401.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError
from sqlalchemy import select

from dicom_factory import brain_images, sample_images
from dicom_io.synthesis import mr_series
from processes import Child, free_port, serve_ready, triage_command, triage_environment, wait_for
from worker.db import Database, Instance, RejectedInstance
from worker.report import results_report

STARTUP_SECONDS = 180
BOUNDARY = "stow-test-boundary"


def _part_file(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[tuple[str, bytes]]) -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("stow") / "data"
    env = triage_environment(models_dir, stow_max_part_mb=1)
    made = Child(triage_command("tokens", "add", "test-pacs", "--data-dir", str(data_dir)), env, name="tokens")
    assert made.popen.wait(timeout=120) == 0, made.output
    token = made.output.strip().splitlines()[-1]
    web_port = free_port()
    serve = Child(triage_command("serve", "--data-dir", str(data_dir), "--dicom-port", str(free_port()),
                                 "--web-port", str(web_port)), env, name="serve")
    try:
        serve.wait_for_line(serve_ready, STARTUP_SECONDS, "serve")
        database = Database(f"sqlite:///{data_dir / 'triage.sqlite3'}")
        yield {"url": f"http://127.0.0.1:{web_port}", "token": token, "database": database, "serve": serve}
        database.dispose()
    finally:
        serve.stop()


def test_dicomweb_client_stores_a_series_that_is_then_classified(server: dict[str, Any]) -> None:
    # Pituitary tumours from the Testing split, without a contrast agent (on an axial post-contrast series a
    # pituitary finding is indeterminate): the session's threshold model (fitted on fixed images) answers this
    # series pituitary, and the test holds the STOW-RS path to that answer.
    series = mr_series(sample_images("brain-tumor-mri/Testing/pituitary/*.jpg", 3, seed=71),
                       patient_name="Stow^Series", series_description="AX T1")
    client = DICOMwebClient(f"{server['url']}/dicomweb", headers={"Authorization": f"Bearer {server['token']}"})
    try:
        answer = client.store_instances(series)
    except HTTPError as exc:
        raise AssertionError(f"{exc}: {exc.response.text}") from exc
    stored = [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence]
    assert stored == [ds.SOPInstanceUID for ds in series]

    def classified() -> dict[str, Any] | None:
        entries = [e for e in results_report(server["database"])["series"]
                   if e["series_instance_uid"] == series[0].SeriesInstanceUID]
        return entries[0] if entries and entries[0]["status"] == "done" else None

    entry = wait_for(classified, 120, "the STOW-RS series classified", server["serve"])
    assert (entry["task"], entry["label"]) == ("brain-tumor", "pituitary")


def test_bad_parts_fail_alone_and_the_valid_ones_are_stored(server: dict[str, Any]) -> None:
    good, truncated = mr_series(brain_images(2, seed=72))
    body = _multipart([
        ("application/dicom", _part_file(good)),
        ("application/dicom", b"this is not DICOM at all" * 10),
        ("application/dicom", _part_file(truncated)[:1500]),  # the header cut inside the data set
        ("text/plain", b"hello"),
    ])
    response = httpx.post(f"{server['url']}/dicomweb/studies", content=body, timeout=60, headers={
        "Authorization": f"Bearer {server['token']}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    })
    assert response.status_code == 202, response.text
    answer = response.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [good.SOPInstanceUID]
    failed = answer["00081198"]["Value"]
    # Each fails alone with an "error: cannot understand" reason (0xCxxx) and says why in words.
    assert [i["00081197"]["Value"][0] & 0xF000 for i in failed] == [0xC000, 0xC000, 0xC000]
    assert all(i["00091001"]["Value"][0] for i in failed)
    assert "not application/dicom" in failed[2]["00091001"]["Value"][0]
    with server["database"].session() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == good.SOPInstanceUID))
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == truncated.SOPInstanceUID)) \
            is None
        reasons = session.scalars(select(RejectedInstance.reason).where(
            RejectedInstance.calling_ae == "test-pacs")).all()
    # Each failure is recorded with the reason the response gave.
    assert {i["00091001"]["Value"][0] for i in failed} <= set(reasons)


def test_a_part_over_the_size_limit_fails_alone(server: dict[str, Any]) -> None:
    (after,) = mr_series(brain_images(1, seed=74))
    body = _multipart([("application/dicom", b"\0" * (3 << 20)), ("application/dicom", _part_file(after))])
    response = httpx.post(f"{server['url']}/dicomweb/studies", content=body, timeout=60, headers={
        "Authorization": f"Bearer {server['token']}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    })
    assert response.status_code == 202, response.text
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700] and "larger than" in failed["00091001"]["Value"][0]
    assert [i["00081155"]["Value"][0] for i in response.json()["00081199"]["Value"]] == [after.SOPInstanceUID]


def test_a_body_whose_boundary_is_not_the_declared_one_is_400_and_stores_nothing(server: dict[str, Any]) -> None:
    (ds,) = mr_series(brain_images(1, seed=75))
    body = _multipart([("application/dicom", _part_file(ds))])
    response = httpx.post(f"{server['url']}/dicomweb/studies", content=body, timeout=60, headers={
        "Authorization": f"Bearer {server['token']}",
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=another-boundary',
    })
    assert response.status_code == 400 and "boundary" in response.json()["detail"], response.text
    with server["database"].session() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is None


def test_a_body_cut_inside_a_part_keeps_the_parts_before_it(server: dict[str, Any]) -> None:
    before, cut = mr_series(brain_images(2, seed=76))
    body = _multipart([("application/dicom", _part_file(before)), ("application/dicom", _part_file(cut))])
    body = body[: body.index(f"--{BOUNDARY}".encode(), len(BOUNDARY) + 4) + 4000]  # stops 4 kB into part two
    response = httpx.post(f"{server['url']}/dicomweb/studies", content=body, timeout=60, headers={
        "Authorization": f"Bearer {server['token']}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    })
    assert response.status_code == 202, response.text
    assert [i["00081155"]["Value"][0] for i in response.json()["00081199"]["Value"]] == [before.SOPInstanceUID]
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00091001"]["Value"] == ["the body ended inside a part"]
    with server["database"].session() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == before.SOPInstanceUID))
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == cut.SOPInstanceUID)) is None


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz"])
def test_without_the_right_token_it_is_401_and_nothing_is_stored(
    server: dict[str, Any], authorization: str | None
) -> None:
    (ds,) = mr_series(brain_images(1, seed=73))
    headers = {"Authorization": authorization} if authorization else {}
    client = DICOMwebClient(f"{server['url']}/dicomweb", headers=headers)
    with pytest.raises(HTTPError) as error:
        client.store_instances([ds])
    assert error.value.response.status_code == 401
    with server["database"].session() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is None


def test_a_body_that_is_not_multipart_related_is_415(server: dict[str, Any]) -> None:
    response = httpx.post(f"{server['url']}/dicomweb/studies", content=b"x", timeout=30, headers={
        "Authorization": f"Bearer {server['token']}", "Content-Type": "application/json"})
    assert response.status_code == 415
