"""Lab file formats in and out (API.md "Lab data"): NIfTI, zipped DICOM series and TIFF stacks
written by nibabel, pydicom and tifffile; geometry round trips; slice order from positions;
value_window; results in the input's format (surviving a restart); bad files answer 4xx with
what to send; decompression bombs are refused while inflating."""
import base64
import gzip
import io
import threading
import time
import zipfile

import numpy as np
import pytest
import tifffile

from models.checkpoint import LoadedModel
from service.codecs import CodecError
from service.labfiles import decode_any
from service.labfiles.dicom import encode_dicom_zip
from service.labfiles.nifti import encode_nifti
from service.labfiles.tiff import encode_tiff
from tests.helpers.labfiles import (AFFINE, ORIENTATION, SPACING, b64, dicom_slice, dicom_zip, gzip_bomb,
                                    nifti_bytes, read_dicom_zip, read_nifti, tiff_stack, zip_bomb)
from tests.helpers.service import MODELS, body, decode, wait_status

LIMIT = 1 << 20
RNG = np.random.default_rng(7)


def decoded(value, files=None, limit=LIMIT):
    return decode_any(value, "observation", max_elements=limit, files=files)


def refused(value, files=None, limit=LIMIT) -> CodecError:
    with pytest.raises(CodecError) as e:
        decoded(value, files, limit)
    return e.value


# ----------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("version", [1, 2])
def test_nifti_axes_scaling_and_header_round_trip(gz, version):
    import nibabel as nib

    xyz = RNG.integers(-500, 1500, size=(6, 5, 4)).astype(np.int16)
    data = nifti_bytes(xyz, gz=gz, version=version, slope=(0.5, -100.0))
    d = decoded({"nifti": b64(data)})
    assert d.slices == 4 and d.array.shape == (4, 5, 6)  # x, y, z -> W, H, D
    np.testing.assert_array_equal(d.array, xyz.transpose(2, 1, 0) * 0.5 - 100.0)
    back = read_nifti(encode_nifti(d.array, d.source))
    src = read_nifti(data)
    assert type(back) is type(src) is (nib.Nifti1Image if version == 1 else nib.Nifti2Image)
    np.testing.assert_array_equal(back.affine, src.affine)
    assert np.abs(back.affine - AFFINE).max() < 1e-6
    assert bytes(back.header["descrip"]).rstrip(b"\0") == b"lab scan"
    assert back.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(back.get_fdata(), xyz * 0.5 - 100.0, rtol=1e-6)


def test_nifti_2d_is_one_slice_and_samples_go_along_the_4th_axis():
    d = decoded({"nifti": b64(nifti_bytes(RNG.random((8, 7, 1)).astype(np.float32)))})
    assert d.slices == 1 and d.array.shape == (7, 8)
    back = read_nifti(encode_nifti(np.zeros((3, 1, 7, 8)), d.source))
    assert back.shape == (8, 7, 1, 3)


@pytest.mark.parametrize("case, fragment", [
    ("4d", "time"), ("truncated_gz", "truncated"), ("truncated", "truncated"), ("garbage", "not a NIfTI"),
    ("not_gzip", "gzip"), ("complex", "data type"),
])
def test_bad_nifti_files_are_refused_with_what_to_send(case, fragment):
    good = nifti_bytes(RNG.random((8, 8, 3)).astype(np.float32), gz=False)
    data = {"4d": lambda: nifti_bytes(RNG.random((8, 8, 3, 5)).astype(np.float32)),
            "truncated_gz": lambda: nifti_bytes(RNG.random((8, 8, 3)).astype(np.float32))[:-40],
            "truncated": lambda: good[:-100],
            "garbage": lambda: b"\x00" * 400,
            "not_gzip": lambda: b"\x1f\x8b" + b"junk" * 50,
            "complex": lambda: nifti_bytes(np.ones((4, 4, 2), np.complex64))}[case]()
    e = refused({"nifti": b64(data)})
    assert e.status == 422 and fragment in str(e) and "send" in str(e)


def test_nifti_over_the_size_limit_is_refused_from_its_header():
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    e = refused({"nifti": b64(hdr.binaryblock + b"\0" * 4)})  # the header alone: no voxel was sent
    assert e.status == 413 and "announces" in str(e)


# ----------------------------------------------------------------------------- DICOM
def _series(depth=5, h=6, w=7):
    return RNG.integers(-200, 800, size=(depth, h, w)).astype(np.int16)


def test_dicom_slices_are_ordered_by_position_not_by_file_name_and_rescaled():
    stored = _series()
    shuffled = [3, 0, 4, 1, 2]
    d = decoded({"dicom": b64(dicom_zip(stored, order=shuffled))})
    assert d.slices == 5
    np.testing.assert_array_equal(d.array, stored * 2.0 - 1024.0)  # in position order, slope and intercept


def test_dicom_geometry_and_identifiers_round_trip_with_new_uids():
    stored = _series()
    data = dicom_zip(stored, order=[2, 4, 0, 3, 1])
    d = decoded({"dicom": b64(data)})
    src = sorted(read_dicom_zip(data), key=lambda ds: int(ds.InstanceNumber))
    result = d.array + 0.25 * RNG.standard_normal(d.array.shape)
    out = read_dicom_zip(encode_dicom_zip(result, d.source))
    assert len(out) == len(src)
    series = {str(ds.SeriesInstanceUID) for ds in out}
    assert len(series) == 1 and series.isdisjoint({str(src[0].SeriesInstanceUID)})
    assert len({str(ds.SOPInstanceUID) for ds in out} | {str(ds.SOPInstanceUID) for ds in src}) == 2 * len(src)
    for a, b, r in zip(out, src, result):
        assert [float(v) for v in a.ImagePositionPatient] == [float(v) for v in b.ImagePositionPatient]
        assert [float(v) for v in a.ImageOrientationPatient] == ORIENTATION
        assert [float(v) for v in a.PixelSpacing] == SPACING and float(a.SliceThickness) == 2.5
        for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "FrameOfReferenceUID",
                    "StudyID", "AccessionNumber", "InstanceNumber", "Modality"):
            assert a.get(key) == b.get(key), key
        assert list(a.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
        values = a.pixel_array * float(a.RescaleSlope) + float(a.RescaleIntercept)
        assert np.abs(values - r).max() <= float(a.RescaleSlope)  # 16-bit quantization of the result
    assert decoded({"dicom": b64(encode_dicom_zip(result, d.source))}).array.shape == result.shape


def _two_series(stored):
    from pydicom.uid import generate_uid
    a, b = generate_uid(), generate_uid()
    return dicom_zip(stored, series_uids=[a, a, b, b, b])


def _uneven(stored):
    normal = np.cross(ORIENTATION[:3], ORIENTATION[3:])
    return dicom_zip(stored, positions=[k * 2.5 * normal for k in (0, 1, 2, 4, 5)])


@pytest.mark.parametrize("case, status, fragment", [
    ("two_series", 422, "2 series"),
    ("uneven", 422, "uneven slice spacing"),
    ("jpeg_ls", 422, "pyjpegls"),
    ("not_zip", 422, "not a valid zip"),
    ("not_dicom", 422, "not a DICOM file"),
    ("truncated_member", 422, "truncated"),
    ("too_large", 413, "headers announce"),
    ("empty", 422, "no files"),
])
def test_bad_dicom_zips_are_refused_with_what_to_send(case, status, fragment):
    from pydicom.uid import JPEGLSLossless

    stored = _series()

    def zipped(members: dict) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in members.items():
                zf.writestr(k, v)
        return buf.getvalue()
    one = dicom_zip(stored[:1])
    member = zipfile.ZipFile(io.BytesIO(one)).read(zipfile.ZipFile(io.BytesIO(one)).namelist()[0])
    data = {"two_series": lambda: _two_series(stored),
            "uneven": lambda: _uneven(stored),
            "jpeg_ls": lambda: dicom_zip(stored[:2], transfer_syntax=JPEGLSLossless),
            "not_zip": lambda: b"PK\x03\x04" + b"x" * 100,
            "not_dicom": lambda: zipped({"notes.txt": b"hello"}),
            "truncated_member": lambda: zipped({"a.dcm": member[:len(member) // 2]}),
            "too_large": lambda: dicom_zip(stored),
            "empty": lambda: zipped({}),
            }[case]()
    e = refused({"dicom": b64(data)}, limit=100 if case == "too_large" else LIMIT)
    assert e.status == status and fragment in str(e) and "send" in str(e), str(e)
    if case == "jpeg_ls":
        assert "JPEG-LS" in str(e)


# ----------------------------------------------------------------------------- TIFF
def test_tiff_pages_are_slices_and_come_back_as_as_many_pages():
    pages = RNG.integers(0, 65535, size=(4, 6, 5)).astype(np.uint16)
    d = decoded({"tiff": b64(tiff_stack(pages))})
    assert d.slices == 4 and not d.from_image
    np.testing.assert_array_equal(d.array, pages / 65535.0)
    with tifffile.TiffFile(io.BytesIO(encode_tiff(d.array))) as tf:
        assert len(tf.pages) == 4
        np.testing.assert_allclose(tf.asarray(), pages / 65535.0, rtol=1e-6)
    single = decoded({"tiff": b64(tiff_stack(pages[0]))})  # one page: one image, as before
    assert single.slices == 1 and single.array.shape == (6, 5) and single.from_image


def test_tiff_stack_of_unequal_pages_and_over_the_limit_are_refused():
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(np.zeros((4, 4), np.uint8))
        tw.write(np.zeros((5, 4), np.uint8))
    assert "differ" in str(refused({"tiff": b64(buf.getvalue())}))
    e = refused({"tiff": b64(tiff_stack(np.zeros((3, 16, 16), np.uint8)))}, limit=500)
    assert e.status == 413


# ----------------------------------------------------------------------------- multipart: told apart by content
def test_file_parts_are_told_apart_by_content():
    stored = _series(3)
    files = {"a": nifti_bytes(np.ones((4, 3, 2), np.float32)), "b": dicom_zip(stored),
             "c": tiff_stack(np.zeros((2, 3, 3), np.uint8)), "d": nifti_bytes(np.ones((4, 3, 2), np.float32), gz=False)}
    got = {k: decoded({"file": k}, files) for k in files}
    assert {k: v.source["format"] for k, v in got.items()} == {"a": "nifti", "b": "dicom", "c": "tiff", "d": "nifti"}
    assert got["b"].array.shape == (3, 6, 7)


# ----------------------------------------------------------------------------- over HTTP
WIN = LoadedModel(dict(MODELS["grf-32"].card, id="win-32", value_range=[0.0, 1.0]), MODELS["grf-32"].denoiser)
HTTP_MODELS = dict(MODELS, **{"win-32": WIN})


def _run(client, b, files=None):
    if files is None:
        r = client.post("/v1/jobs", json=b)
    else:
        import json
        r = client.post("/v1/jobs", data={"request": json.dumps(b)}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    st = wait_status(client, job_id)
    assert st["status"] == "succeeded", st
    return job_id


def _identity(**kw):
    return body(**{"operator": {"kind": "identity"}, "num_samples": 2, "noise_sigma": 0.05, **kw})


def test_value_window_maps_data_units_to_the_card_and_results_back(make_client):
    client = make_client(models=HTTP_MODELS)
    card_units = RNG.random((32, 32, 1)) * 0.8 + 0.1
    hu = -1000.0 + 2000.0 * card_units  # the same image in the data's units
    a = _run(client, _identity(model="win-32", observation={"nifti": b64(nifti_bytes(card_units))}))
    b = _run(client, _identity(model="win-32", observation={"nifti": b64(nifti_bytes(hu))},
                               noise_sigma=100.0, value_window=[-1000, 1000]))
    ra, rb = client.get(f"/v1/jobs/{a}/result").json(), client.get(f"/v1/jobs/{b}/result").json()
    np.testing.assert_allclose(decode(rb["mean"]), -1000.0 + 2000.0 * decode(ra["mean"]), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(decode(rb["std"]), 2000.0 * decode(ra["std"]), rtol=1e-5, atol=1e-3)
    nii = read_nifti(client.get(f"/v1/jobs/{b}/result?format=nifti").content)
    np.testing.assert_allclose(nii.get_fdata()[:, :, 0].T, decode(rb["mean"])[0], rtol=1e-6, atol=1e-3)
    # without the window the same data are out of the card's range
    r = client.post("/v1/jobs", json=_identity(model="win-32", observation={"nifti": b64(nifti_bytes(hu))}))
    assert r.status_code == 422 and r.json()["error"]["code"] == "out_of_range"
    r = client.post("/v1/jobs", json=_identity(observation={"nifti": b64(nifti_bytes(hu))}, value_window=[0, 1]))
    assert r.status_code == 422 and "value_window" in r.json()["error"]["message"]  # grf-32: no value range
    r = client.post("/v1/jobs", json=_identity(model="win-32", observation={"nifti": b64(nifti_bytes(hu))},
                                               value_window=[5, 1]))
    assert r.status_code == 422 and "lo < hi" in r.json()["error"]["message"]


def test_results_in_the_inputs_format_survive_a_restart(make_client, tmp_path):
    data_dir = tmp_path / "store"
    client = make_client(models=HTTP_MODELS, data_dir=data_dir)
    stored = RNG.integers(0, 1000, size=(1, 32, 32)).astype(np.int16)
    zipped = dicom_zip(stored, slope=0.001, intercept=0.0)
    dicom_job = _run(client, _identity(model="win-32", observation={"dicom": b64(zipped)}))
    nifti_job = _run(client, _identity(observation={"file": "scan"}), files={"scan": nifti_bytes(
        RNG.standard_normal((32, 32, 1)).astype(np.float32))})
    before = client.get(f"/v1/jobs/{dicom_job}/result?format=dicom").content
    client.__exit__(None, None, None)
    client = make_client(models=HTTP_MODELS, data_dir=data_dir)  # a new process on the same store
    r = client.get(f"/v1/jobs/{dicom_job}/result", params={"format": "dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    (out,), (src,), (old,) = read_dicom_zip(r.content), read_dicom_zip(zipped), read_dicom_zip(before)
    assert out.ImagePositionPatient == src.ImagePositionPatient and out.PatientID == src.PatientID
    assert out.SeriesInstanceUID != src.SeriesInstanceUID and list(out.ImageType)[:1] == ["DERIVED"]
    np.testing.assert_allclose(out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept),
                               old.pixel_array * float(old.RescaleSlope) + float(old.RescaleIntercept), atol=1e-6)
    r = client.get(f"/v1/jobs/{nifti_job}/result", headers={"Accept": "application/x-nifti"})
    assert r.headers["content-type"] == "application/x-nifti"
    np.testing.assert_array_equal(read_nifti(r.content).affine, read_nifti(nifti_bytes(np.zeros((1, 1, 1)))).affine)
    r = client.get(f"/v1/jobs/{nifti_job}/result?format=tiff&field=samples")
    with tifffile.TiffFile(io.BytesIO(r.content)) as tf:
        assert len(tf.pages) == 2  # two samples of one slice
    assert client.get(f"/v1/jobs/{nifti_job}/result?format=dicom").status_code == 422
    npy = np.load(io.BytesIO(client.get(f"/v1/jobs/{nifti_job}/result?format=npy&field=std").content))
    np.testing.assert_allclose(npy, decode(client.get(f"/v1/jobs/{nifti_job}/result").json()["std"]))


@pytest.mark.parametrize("observation", [
    {"nifti": b64(b"\x1f\x8b\x08\x00" + b"\x00" * 30)},
    {"dicom": b64(b"PK\x05\x06" + b"\x00" * 18)},
    {"nifti": "not base64!"},
    {"nifti": b64(nifti_bytes(np.ones((8, 8, 2, 3), np.float32)))},
    {"dicom": b64(nifti_bytes(np.ones((8, 8, 2), np.float32)))},
    {"tiff": b64(b"II*\x00" + b"\x00" * 64)},
    {"nifti": b64(nifti_bytes(np.ones((8, 8, 2), np.float32))), "npy": "AAAA"},
])
def test_bad_files_over_http_are_4xx_never_5xx(client, observation):
    r = client.post("/v1/jobs", json=body(operator={"kind": "identity"}, observation=observation))
    assert 400 <= r.status_code < 500, r.text
    assert "send" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- bombs
def _rss(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _peak_growth(fn, pid="self") -> tuple[object, int]:
    """``(fn(), the largest RSS growth of process ``pid`` seen while it ran)``, sampled every 2 ms."""
    base, peak, done = _rss(pid), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid) - base)
            time.sleep(0.002)
    t = threading.Thread(target=watch)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, peak[0]


def _bombs() -> dict:
    """A 1 GB gzip and a 1 GB zip, each behind a valid header (NIfTI; DICOM) and of zeros alone."""
    header = nifti_bytes(np.ones((32, 32, 1), np.float32), gz=False)  # grf-32's size: admitted, then inflated
    slice_ = dicom_slice(np.zeros((32, 32), np.int16), 0, series_uid="1.2.3", study_uid="1.2.4", frame_uid="1.2.5")
    return {"gzip NIfTI": {"nifti": b64(gzip_bomb(header))}, "gzip of zeros": {"nifti": b64(gzip_bomb(b""))},
            "zip DICOM": {"dicom": b64(zip_bomb(slice_))}, "zip of zeros": {"dicom": b64(zip_bomb(b""))}}


@pytest.fixture(scope="module")
def bombs():
    return _bombs()


def test_gzip_and_zip_bombs_of_1gb_are_refused_while_inflating(client, bombs):
    for name, obs in bombs.items():
        assert len(next(iter(obs.values()))) < 2_000_000  # small compressed...
        r, grown = _peak_growth(lambda: client.post("/v1/jobs", json=body(operator={"kind": "identity"},
                                                                          observation=obs)))
        assert 400 <= r.status_code < 500, (name, r.text)
        assert grown < 50 * 2**20, (name, grown / 2**20)  # ...never inflated whole (1 GB)
        if name.endswith("NIfTI") or name.endswith("DICOM"):
            assert r.status_code == 413 and "inflates past" in r.json()["error"]["message"], (name, r.text)


@pytest.mark.slow
def test_a_real_servers_memory_stays_flat_under_the_bombs(bombs):
    import httpx

    from tests.helpers.server import start_server, stop_server

    proc, url = start_server()
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/v1/jobs", json=body(operator={"kind": "identity"}, observation={
                "nifti": b64(nifti_bytes(np.ones((32, 32, 1), np.float32)))}))  # warm: the decoders imported
            for name, obs in bombs.items():
                r, grown = _peak_growth(lambda: http.post("/v1/jobs", json=body(operator={"kind": "identity"},
                                                                                observation=obs)), proc.pid)
                assert 400 <= r.status_code < 500 and grown < 50 * 2**20, (name, r.status_code, grown / 2**20)
    finally:
        stop_server(proc)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gzip NIfTI", "zip DICOM"])
def test_the_bombs_are_real(bombs, name):
    assert _inflated(next(iter(bombs[name].values()))) >= 1 << 30  # 1 GB when inflated, CRC and all


def _inflated(text: str) -> int:
    """Bytes a gzip or zip (first member) inflates to, read 16 MiB at a time (CRC checked at the end)."""
    data = base64.b64decode(text)
    if data.startswith(b"PK"):
        handle = zipfile.ZipFile(io.BytesIO(data)).open(zipfile.ZipFile(io.BytesIO(data)).infolist()[0])
    else:
        handle = gzip.GzipFile(fileobj=io.BytesIO(data))
    total = 0
    while chunk := handle.read(1 << 24):
        total += len(chunk)
    return total


# ----------------------------------------------------------------------------- volumes over HTTP
def test_volumes_from_lab_files_come_back_in_their_format_and_geometry(make_client):
    client = make_client()
    xyz = RNG.standard_normal((32, 32, 3)).astype(np.float32)
    nifti = nifti_bytes(xyz)
    job = _run(client, _identity(observation={"nifti": b64(nifti)}))
    out, src = read_nifti(client.get(f"/v1/jobs/{job}/result?format=nifti").content), read_nifti(nifti)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out.affine, src.affine)
    mean = decode(client.get(f"/v1/jobs/{job}/result").json()["mean"])  # [D, C, H, W]
    np.testing.assert_allclose(out.get_fdata(), mean[:, 0].transpose(2, 1, 0), rtol=1e-6)

    stored = RNG.integers(0, 600, size=(3, 32, 32)).astype(np.int16)
    zipped = dicom_zip(stored, order=[2, 0, 1], slope=0.002, intercept=-0.5)
    job = _run(client, _identity(observation={"file": "series"}), files={"series": zipped})
    series = read_dicom_zip(client.get(f"/v1/jobs/{job}/result", headers={"Accept": "application/zip"}).content)
    src = sorted(read_dicom_zip(zipped), key=lambda ds: int(ds.InstanceNumber))
    assert [ds.ImagePositionPatient for ds in series] == [ds.ImagePositionPatient for ds in src]
    assert len({ds.SeriesInstanceUID for ds in series}) == 1 and series[0].SeriesInstanceUID != src[0].SeriesInstanceUID

    pages = RNG.integers(0, 255, size=(3, 32, 32)).astype(np.uint8)
    job = _run(client, _identity(observation={"tiff": b64(tiff_stack(pages))}))
    with tifffile.TiffFile(io.BytesIO(client.get(f"/v1/jobs/{job}/result?format=tiff").content)) as tf:
        assert len(tf.pages) == 3


# ----------------------------------------------------------------------------- client and CLI
def _write_series(folder, stored):
    folder.mkdir()
    with zipfile.ZipFile(io.BytesIO(dicom_zip(stored, order=[1, 0]))) as zf:
        for name in zf.namelist():
            (folder / name).write_bytes(zf.read(name))


def test_client_takes_a_path_and_returns_the_result_in_its_format(make_client, tmp_path):
    from service.client import Client

    app_client = make_client()
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(nifti_bytes(RNG.standard_normal((32, 32, 1)).astype(np.float32)))
    _write_series(tmp_path / "series", RNG.integers(0, 500, size=(2, 32, 32)).astype(np.int16))
    c = Client("http://testserver")
    c.http.close()
    c.http = app_client  # the client over the in-process app (TestClient is an httpx.Client)
    out = c.reconstruct("grf-32", {"kind": "identity"}, scan, noise_sigma=0.05, method={"name": "fast", "steps": 4},
                        out=tmp_path / "recon.nii")
    back = read_nifti((tmp_path / "recon.nii").read_bytes())
    assert (tmp_path / "recon.nii").read_bytes()[:2] != b"\x1f\x8b"  # .nii: written uncompressed
    np.testing.assert_array_equal(back.affine, read_nifti(scan.read_bytes()).affine)
    np.testing.assert_allclose(back.get_fdata()[:, :, 0].T, out["mean"][0], rtol=1e-6)
    assert read_nifti(out["file"]).shape == (32, 32, 1)
    series = c.reconstruct("grf-32", {"kind": "identity"}, tmp_path / "series", noise_sigma=0.05,
                           method={"name": "fast", "steps": 4})
    assert len(read_dicom_zip(series["file"])) == 2 and series["mean"].shape == (2, 1, 32, 32)
    job = c.submit("grf-32", {"kind": "identity"}, scan, noise_sigma=0.05, method={"name": "fast", "steps": 4})
    wait_status(app_client, job)  # (Client.wait streams events, which the in-process transport cannot)
    with tifffile.TiffFile(c.save_result(job, tmp_path / "samples.tif", field="samples")) as tf:
        assert len(tf.pages) == 1
    with pytest.raises(ValueError):
        c.save_result(job, tmp_path / "recon.png")


def _cli(*args) -> int:
    from service.cli import main
    return main(["solve", "--model", "grf-32", "--method", "fast", "--steps", "4", "--noise-sigma", "0.05",
                 *map(str, args)])


def test_cli_solves_a_nifti_into_a_nifti_and_a_dicom_folder_into_a_zip(tmp_path, capsys):
    (tmp_path / "op.json").write_text('{"kind": "identity"}')
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(nifti_bytes(RNG.standard_normal((32, 32, 1)).astype(np.float32)))
    assert _cli("--operator", tmp_path / "op.json", "--observation", scan, "--out", tmp_path / "r.nii.gz") == 0
    assert _cli("--operator", tmp_path / "op.json", "--observation", scan, "--out", tmp_path / "r.npz") == 0
    recon = read_nifti((tmp_path / "r.nii.gz").read_bytes())
    np.testing.assert_array_equal(recon.affine, read_nifti(scan.read_bytes()).affine)
    np.testing.assert_allclose(recon.get_fdata()[:, :, 0].T, np.load(tmp_path / "r.npz")["mean"][0], rtol=1e-6)
    _write_series(tmp_path / "series", RNG.integers(0, 500, size=(2, 32, 32)).astype(np.int16))
    assert _cli("--operator", tmp_path / "op.json", "--observation", tmp_path / "series",
                "--out", tmp_path / "r.zip") == 0
    assert len(read_dicom_zip((tmp_path / "r.zip").read_bytes())) == 2
    assert _cli("--operator", tmp_path / "op.json", "--observation", scan, "--out", tmp_path / "r.png") == 2
    assert "result is written as" in capsys.readouterr().err
    assert _cli("--operator", tmp_path / "op.json", "--observation", scan, "--out", tmp_path / "r2.zip") == 2
    err = capsys.readouterr().err
    assert "dicom needs a DICOM observation" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_through_a_server_writes_the_result_in_the_observations_format(tmp_path):
    from tests.helpers.server import start_server, stop_server

    (tmp_path / "op.json").write_text('{"kind": "identity"}')
    scan = tmp_path / "scan.nii"
    scan.write_bytes(nifti_bytes(RNG.standard_normal((32, 32, 2)).astype(np.float32), gz=False))
    proc, url = start_server()
    try:
        assert _cli("--operator", tmp_path / "op.json", "--observation", scan, "--server", url,
                    "--out", tmp_path / "recon.nii.gz") == 0
    finally:
        stop_server(proc)
    recon, src = read_nifti((tmp_path / "recon.nii.gz").read_bytes()), read_nifti(scan.read_bytes())
    assert recon.shape == src.shape == (32, 32, 2)
    np.testing.assert_array_equal(recon.affine, src.affine)


# ----------------------------------------------------------------------------- any size: the header says it
def test_admission_reads_a_lab_files_size_from_its_header(client):
    from service.labfiles.peek import lab_shape

    nifti, zipped = nifti_bytes(np.zeros((48, 40, 2), np.float32)), dicom_zip(np.zeros((3, 24, 20), np.int16))
    assert lab_shape({"nifti": b64(nifti)}) == (2, 40, 48) and lab_shape({"file": "z"}, {"z": zipped}) == (3, 24, 20)
    assert lab_shape({"nifti": b64(b"\x1f\x8b garbage")}) is None  # the decoder answers it
    r = client.post("/v1/jobs", json=body(operator={"kind": "identity"}, observation={"nifti": b64(nifti)}))
    assert r.status_code == 422 and "40 x 48 image" in r.json()["error"]["message"]  # refused at admission


@pytest.mark.slow
def test_a_nifti_of_another_size_on_a_tiled_prior(make_client):
    from models.checkpoint import load_models
    from service.settings import Settings

    phantom = load_models(Settings().checkpoints_dir)["phantom-64"]
    client = make_client(models={"phantom-64": phantom})
    nifti = nifti_bytes(RNG.random((96, 80, 1)).astype(np.float32))
    job = _run(client, _identity(model="phantom-64", observation={"nifti": b64(nifti)}, num_samples=1,
                                 method={"name": "fast", "steps": 3}))
    out = read_nifti(client.get(f"/v1/jobs/{job}/result?format=nifti").content)
    assert out.shape == (96, 80, 1)
    np.testing.assert_array_equal(out.affine, read_nifti(nifti).affine)


def test_a_dicom_series_as_nifti_is_in_its_scanner_geometry():
    stored = _series(depth=4)
    data = dicom_zip(stored, order=[3, 1, 0, 2])
    d = decoded({"dicom": b64(data)})
    nii = read_nifti(encode_nifti(d.array, d.source))
    src = sorted(read_dicom_zip(data), key=lambda ds: int(ds.InstanceNumber))
    for k, ds in enumerate(src):
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(nii.affine @ [0, 0, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)
    np.testing.assert_allclose(nii.affine @ [1, 0, 0, 0], [-SPACING[1] * o for o in ORIENTATION[:2]] +
                               [SPACING[1] * ORIENTATION[2], 0], atol=1e-6)  # one column: along the row direction
    np.testing.assert_allclose(nii.get_fdata(), d.array.transpose(2, 1, 0), rtol=1e-6)


def test_one_dicom_file_is_a_one_slice_series():
    one = dicom_slice(_series(1)[0], 0, series_uid="1.2.3", study_uid="1.2.4", frame_uid="1.2.5")
    for d in (decoded({"dicom": b64(one)}), decoded({"file": "f"}, {"f": one})):
        assert d.source["format"] == "dicom" and d.slices == 1 and d.array.shape == (6, 7)


@pytest.mark.parametrize("kind", ["nifti.gz", "nifti", "dicom", "tiff"])
def test_damaged_files_are_refused_as_codec_errors_only(kind):
    """Cut short or with bytes flipped anywhere, a file decodes or is refused (a 4xx), never
    raises anything else (which the service would answer 500)."""
    rng = np.random.default_rng(11)
    good = {"nifti.gz": lambda: nifti_bytes(rng.random((8, 6, 3)).astype(np.float32)),
            "nifti": lambda: nifti_bytes(rng.random((8, 6, 3)).astype(np.float32), gz=False),
            "dicom": lambda: dicom_zip(_series(3)),
            "tiff": lambda: tiff_stack((rng.random((3, 6, 8)) * 255).astype(np.uint8))}[kind]()
    key = kind.split(".")[0]
    damaged = [good[:n] for n in rng.integers(1, len(good), 40)]
    for _ in range(80):
        b = bytearray(good)
        for i in rng.integers(0, len(b), rng.integers(1, 4)):
            b[i] = int(rng.integers(0, 256))
        damaged.append(bytes(b))
    refusals = 0
    for data in damaged:
        try:
            d = decoded({key: b64(data)})
        except CodecError as e:
            assert e.status in (413, 422) and "send" in str(e), str(e)
            refusals += 1
            continue
        _results_or_refusals(d)  # what was read is written back, or refused (a 4xx)
    assert refusals >= 40  # every cut file at least


def _results_or_refusals(d) -> None:
    from service.labfiles.results import Samples, result_file

    samples = Samples(np.stack([d.array if d.slices > 1 else d.array[None]] * 2).astype(np.float32))
    for fmt in ("nifti", "dicom", "tiff", "npy"):
        for field in ("mean", "std", "samples"):
            try:
                result_file(fmt, field, samples, {"source": d.source, "window": [1.0, 0.0]})
            except CodecError as e:
                assert e.status == 422 and "ask for" in str(e), str(e)


def test_a_windowed_lab_job_is_rebuilt_the_same_after_a_restart(make_client):
    """What recovery runs (the stored request and arrays, prepared again) is the problem the
    job was accepted with: the observation in the card's units, its noise, and the file header."""
    client = make_client(models=HTTP_MODELS)
    client.manager.pause()  # the job stays queued
    hu = -1000.0 + 2000.0 * (RNG.random((32, 32, 3)) * 0.8 + 0.1)
    r = client.post("/v1/jobs", json=_identity(model="win-32", observation={"nifti": b64(nifti_bytes(hu))},
                                               noise_sigma=100.0, value_window=[-1000, 1000]))
    assert r.status_code == 202, r.text
    state, job_id = client.app.state.reconserve, r.json()["id"]
    accepted = client.manager.get(job_id).problem
    record = state.jobs.store.get(job_id)
    files = state.jobs.store.load_request_files(record)
    rebuilt = state.rebuild(record, files)
    np.testing.assert_array_equal(rebuilt.y.numpy(), accepted.y.numpy())
    assert rebuilt.noise_sigma == accepted.noise_sigma == pytest.approx(0.05)
    assert float(accepted.y.max()) <= 1.0 and float(accepted.y.min()) >= 0.0  # the card's units
    assert "observation.lab" in files and record.request["observation"] == {"file": "observation"}


def test_reconstruct_answers_the_file_it_is_asked_for(client):
    nifti = nifti_bytes(RNG.standard_normal((32, 32, 1)).astype(np.float32))
    r = client.post("/v1/reconstruct?format=nifti&field=std", json=_identity(observation={"nifti": b64(nifti)}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-nifti"
    assert r.headers["content-disposition"].endswith('-std.nii.gz"')
    out = read_nifti(r.content)
    np.testing.assert_array_equal(out.affine, read_nifti(nifti).affine)
    assert (out.get_fdata() > 0).all()  # a standard deviation
    r = client.post("/v1/reconstruct", json=_identity(observation={"nifti": b64(nifti)}), headers={"Accept": "image/tiff"})
    assert r.headers["content-type"] == "image/tiff"
    r = client.post("/v1/reconstruct?format=nifti&field=std", json=_identity(observation={"nifti": b64(nifti)},
                                                                              num_samples=1))
    assert r.status_code == 422 and "num_samples" in r.json()["error"]["message"]
