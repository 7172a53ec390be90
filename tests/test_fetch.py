"""mlx_paligemma.processing.fetch against real fetch targets on 127.0.0.1 (http_targets): the total deadline, the byte
cap, redirects checked hop by hop, the address policy (local refused by default, allowed when asked), one message for
every network failure, local files kept inside their root; and the surfaces that use it (load_image, the mask decoder
download)."""

import io
import os
import socket
import threading
import tracemalloc

import pytest
from PIL import Image

import mlx_paligemma as mp
from mlx_paligemma.processing import fetch as f
from mlx_paligemma.formats import mask_decoder
from mlx_paligemma.errors import InputError, cause
# fresh_targets is autouse: imported, it resets what the targets recorded before each test here.
from http_targets import DRIP_BYTES, ENDLESS_CHUNKS, Targets, fresh_targets, png, serve  # noqa: F401

@pytest.fixture(scope="module")
def host():
    with serve() as url:
        yield url


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once it is closed


def test_allowed_local_fetch_gives_the_body(host):
    assert f.fetch(host + "/image.png", allow_private=True) == png()


LOCAL = ["http://127.0.0.1:{port}/image.png", "http://localhost:{port}/image.png", "http://2130706433:{port}/",
         "http://0x7f.1:{port}/", "http://017700000001:{port}/", "http://127.1:{port}/",
         "http://[::ffff:127.0.0.1]:{port}/", "http://[::1]:{port}/", "http://0.0.0.0:{port}/",
         "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/",
         "http://100.64.0.1/", "http://224.0.0.1/", "http://255.255.255.255/", "http://[fe80::1]/", "http://[fc00::1]/",
         "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/", "http://[::]/"]


@pytest.mark.parametrize("url", LOCAL)
def test_local_and_private_addresses_are_refused_by_default(host, url, monkeypatch):
    monkeypatch.delenv(f.ALLOW_PRIVATE_ENV, raising=False)
    port = host.rsplit(":", 1)[1]
    before = len(Targets.hits)
    with pytest.raises(InputError, match="not a public address") as refused:
        f.fetch(url.format(port=port))
    assert not isinstance(refused.value, f.FetchError)  # the policy's own message, said before connecting
    assert len(Targets.hits) == before  # nothing reached the target


def test_the_flag_and_the_environment_allow_local_addresses(host, monkeypatch):
    port = host.rsplit(":", 1)[1]
    assert f.fetch(f"http://localhost:{port}/image.png", allow_private=True) == png()
    assert f.fetch(f"http://2130706433:{port}/image.png", allow_private=True) == png()
    monkeypatch.setenv(f.ALLOW_PRIVATE_ENV, "1")
    assert f.fetch(host + "/image.png") == png()
    with pytest.raises(InputError, match="not a public address"):  # an explicit False wins over the environment
        f.fetch(host + "/image.png", allow_private=False)


def test_public_addresses_pass_the_rule():
    for address in ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "2a00:1450:4001::200e"]:
        assert f.is_public(address), address
    for address in ["127.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0", "198.18.0.1", "192.0.2.1"]:
        assert not f.is_public(address), address


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1/",
                                 "http:///nohost", "http://127.0.0.1:99999/"])
def test_only_http_and_https_with_a_host(url):
    with pytest.raises(InputError) as refused:
        f.fetch(url, allow_private=True)
    assert not isinstance(refused.value, f.FetchError) and "\n" not in str(refused.value)


def test_a_dripping_url_ends_at_the_deadline(host):
    with pytest.raises(f.FetchError):
        f.fetch(host + "/drip", timeout=1.0, allow_private=True)
    # A per-read timeout would have read all DRIP_BYTES (each arrives well within 1 s): the client stopped early.
    for _ in range(200):  # the target notices at its next write
        if "/drip" in Targets.sent:
            break
        threading.Event().wait(0.05)
    assert Targets.sent["/drip"] < DRIP_BYTES // 2


def test_an_endless_url_stops_at_the_cap_without_reading_it_whole(host):
    tracemalloc.start()
    try:
        with pytest.raises(f.FetchError):
            f.fetch(host + "/endless", max_bytes=2**20, allow_private=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # the cap and a chunk, not the stream
    threading.Event().wait(0.5)
    assert Targets.sent["/endless"] < ENDLESS_CHUNKS


def test_redirects_are_followed_and_checked_at_every_hop(host, monkeypatch):
    port = host.rsplit(":", 1)[1]
    assert f.fetch(f"{host}/to/http://127.0.0.1:{port}/image.png", allow_private=True) == png()
    assert f.fetch(f"{host}/to//image.png", allow_private=True) == png()  # relative
    with pytest.raises(InputError, match="only http and https"):
        f.fetch(f"{host}/to/ftp://127.0.0.1/x.png", allow_private=True)
    with pytest.raises(f.FetchError):
        f.fetch(f"{host}/loop", allow_private=True)
    # With 127.0.0.1 taken as public, a redirect to another loopback address is refused at its hop.
    real = f.is_public
    monkeypatch.setattr(f, "is_public", lambda a: a == "127.0.0.1" or real(a))
    before = len(Targets.hits)
    with pytest.raises(InputError, match="127.0.0.2 is not a public address"):
        f.fetch(f"{host}/to/http://127.0.0.2:{port}/image.png")
    assert Targets.hits[before:] == [f"/to/http://127.0.0.2:{port}/image.png"]


def test_failures_do_not_tell_closed_ports_from_open_ones(host):
    """Refused, 404, an open port that does not speak HTTP, a timeout: the same words (the URL aside)."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # accepts connections, never answers
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen(8)

    def talk():
        for _ in range(2):
            try:
                connection, _ = garbage.accept()
            except OSError:
                return
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            connection.close()

    threading.Thread(target=talk, daemon=True).start()
    urls = [f"http://127.0.0.1:{closed_port()}/x", host + "/missing",
            f"http://127.0.0.1:{garbage.getsockname()[1]}/x", f"http://127.0.0.1:{mute.getsockname()[1]}/x"]
    messages = set()
    try:
        for url in urls:
            with pytest.raises(f.FetchError) as failed:
                f.fetch(url, timeout=1.0, max_bytes=1000, allow_private=True)
            messages.add(str(failed.value).replace(url, "URL"))
    finally:
        mute.close()
        garbage.close()
    assert len(messages) == 1, messages


def test_load_image_uses_the_policy_and_names_the_url(host, monkeypatch):
    monkeypatch.delenv(f.ALLOW_PRIVATE_ENV, raising=False)
    with pytest.raises(InputError, match="not a public address"):
        mp.load_image(host + "/image.png")
    monkeypatch.setenv(f.ALLOW_PRIVATE_ENV, "1")
    assert mp.load_image(host + "/image.png").size == (6, 4)
    # Not an image: the neutral message, with the URL and no object's repr.
    with pytest.raises(f.FetchError) as failed:
        mp.load_image(host + "/hello")
    assert host + "/hello" in str(failed.value) and " at 0x" not in str(failed.value)
    with pytest.raises(InputError, match="only http and https"):
        mp.load_image("ftp://127.0.0.1/x.png")


def test_no_object_repr_in_messages(tmp_path):
    (tmp_path / "x.png").write_bytes(b"hello")
    with pytest.raises(InputError) as failed:
        mp.load_image(tmp_path / "x.png")
    assert str(tmp_path / "x.png") in str(failed.value) and " at 0x" not in str(failed.value)
    # PIL's own message names the stream by its repr; cause() keeps the type and drops the address.
    with pytest.raises(Exception) as raised:
        Image.open(io.BytesIO(b"hello"))
    e = raised.value
    assert "object at 0x" in str(e) and "object at 0x" not in cause(e) and "BytesIO" in cause(e)


def test_the_mask_decoder_download_is_capped(host, tmp_path, monkeypatch):
    monkeypatch.setenv(f.ALLOW_PRIVATE_ENV, "1")
    monkeypatch.setattr(mask_decoder, "VAE_OID_URL", host + "/endless")
    monkeypatch.setattr(mask_decoder, "VAE_OID_MAX_BYTES", 2**20)
    with pytest.raises(InputError, match="cannot download the mask decoder"):
        mask_decoder.fetch_vae_oid(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the cached name nor a .part is left


def test_local_files_stay_inside_their_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png())
    outside.write_bytes(png())
    (root / "link.png").symlink_to(outside)
    (root / "sublink").symlink_to(tmp_path)
    assert f.read_local("sub/a.png", root, 10**6) == png()
    assert f.read_local(root / "sub" / "a.png", root, 10**6) == png()
    assert f.read_local("sub/../sub/a.png", root, 10**6) == png()
    messages = set()
    for path in ["../outside.png", "link.png", "sublink/outside.png", str(outside), "/etc/passwd",
                 "../missing.png", "/nonexistent/x.png"]:
        with pytest.raises(InputError, match="outside") as refused:
            f.read_local(path, root, 10**6)
        messages.add(str(refused.value).replace(path, "PATH"))
    assert len(messages) == 1  # existing or not, outside is outside
    os.mkfifo(root / "fifo")
    with pytest.raises(InputError, match="not a regular file"):
        f.read_local("fifo", root, 10**6)
    with pytest.raises(InputError, match="more than 10 bytes"):
        f.read_local("sub/a.png", root, 10)
    with pytest.raises(InputError, match="not found"):
        f.read_local("nothing.png", root, 10)
