"""The URL guard: schemes, blocked networks, allowlists, caps, image checks."""

from __future__ import annotations

import io
import ipaddress

import pytest
from PIL import Image

from mmcore.data.config import GuardConfig
from mmcore.data.synthetic.corpus import _bomb_png
from mmcore.data.urlguard import FetchError, blocked_label, check_image, check_url, resolve

POLICY = GuardConfig()


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "scheme_not_allowed"),
    ("ftp://example.com/a.jpg", "scheme_not_allowed"),
    ("data:image/png;base64,AAAA", "scheme_not_allowed"),
    ("gopher://example.com/", "scheme_not_allowed"),
    ("//example.com/a.jpg", "scheme_not_allowed"),
    ("http://", "malformed_url"),
    ("http://exa mple.com/a.jpg", "malformed_url"),
    ("http://example.com:99999/a.jpg", "malformed_url"),
    ("", "malformed_url"),
    ("http://example.com/a\n.jpg", "malformed_url"),
])
def test_bad_urls_are_refused_with_their_reason(url, reason):
    with pytest.raises(FetchError) as err:
        check_url(url, POLICY)
    assert err.value.reason == reason
    assert str(err.value).startswith(reason + ": ")


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "HTTPS://Example.com/x?y=1", "http://[2001:4860::8888]/a"])
def test_good_urls_pass(url):
    check_url(url, POLICY)


@pytest.mark.parametrize("address, label", [
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("0.0.0.0", "this-network"),
    ("169.254.169.254", "link-local"), ("100.100.100.200", "CGNAT"), ("224.0.0.1", "multicast"),
    ("::1", "loopback"), ("fd00:ec2::254", "unique local (ULA)"), ("fe80::1", "link-local"),
    ("::ffff:10.0.0.1", "private"), ("64:ff9b::7f00:1", "loopback"),
])
def test_blocked_networks(address, label):
    assert blocked_label(ipaddress.ip_address(address), POLICY) == label


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert blocked_label(ipaddress.ip_address(address), POLICY) is None


def test_allowlist_opens_exactly_the_named_network():
    policy = GuardConfig(allow_networks=["127.0.0.1/32"])
    assert blocked_label(ipaddress.ip_address("127.0.0.1"), policy) is None
    assert blocked_label(ipaddress.ip_address("127.0.0.2"), policy) == "loopback"
    assert blocked_label(ipaddress.ip_address("::1"), policy) == "loopback"
    assert blocked_label(ipaddress.ip_address("10.0.0.1"), policy) == "private"


def test_resolve_checks_every_address_of_a_name():
    with pytest.raises(FetchError, match="blocked_network: localhost resolves to"):
        resolve("localhost", 80, POLICY)
    assert resolve("127.0.0.1", 80, GuardConfig(allow_networks=["127.0.0.1/32"])) == "127.0.0.1"


def test_allow_networks_must_be_cidrs():
    with pytest.raises(ValueError, match="guard.allow_networks: 'loopback'"):
        GuardConfig(allow_networks=["loopback"]).validate()


def _jpeg(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_image_checks():
    check_image(_jpeg(), POLICY)
    cases = [
        (b"", "empty_body"),
        (b"<!DOCTYPE html><html></html>", "not_an_image"),
        (_jpeg()[:200], "truncated_image"),
        (_bomb_png(), "too_many_pixels"),
    ]
    for body, reason in cases:
        with pytest.raises(FetchError) as err:
            check_image(body, POLICY)
        assert err.value.reason == reason, (reason, str(err.value))


def test_pixel_limit_is_configurable():
    with pytest.raises(FetchError, match="too_many_pixels: header declares 64x48"):
        check_image(_jpeg((64, 48)), GuardConfig(max_pixels=1000))
