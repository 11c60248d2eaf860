"""The one raw-input generator of the harness: seeded, deterministic streams of raw records, as the SDKs send
them, for make bench (and its scale runs) and make chaos.

Devices of the mini-program and web platforms with realistic IDs; ~90% track events (URLs, titles,
referrers, a launch scene), the rest every identity action (login with and without a key, bind, unbind,
logout, identify, reset_anonymous_id, set_customer_ids, profile_set), each plausible for the device's state;
a small share of bad records of eight kinds, each a dead letter (those that are no JSON object with a
device_id have no key: they land in any partition). Every record's `time` is its own, so no two records are
alike. A file, once generated, is kept: the same arguments give the same bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

GENERATOR_VERSION = 2  # bump when the generator changes: cached inputs are named after it
T0_MS = 1_712_000_000_000
BAD_RATE = 0.001  # make bench's share of bad records; make chaos asks for more
PLATFORM_WEIGHTS = {
    "mp-wechat": 40, "web": 22, "mp-alipay": 10, "mp-bytedance": 8, "mp-baidu": 4, "mp-jd": 4,
    "mp-kuaishou": 3, "mp-xiaohongshu": 3, "mp-taobao": 2, "mp-qq": 2, "mp-feishu": 2,
}  # fmt: skip
NO_ASSOCIATION = frozenset({"mp-jd", "mp-kuaishou", "mp-qq"})  # no bind, unbind, reset or login key there
# per mille of the valid records: track ~90%, the identity actions the rest
ACTION_WEIGHTS = {
    "track": 900, "set_customer_ids": 20, "login": 20, "bind": 15, "logout": 12, "identify": 12, "unbind": 8,
    "profile_set": 8, "reset_anonymous_id": 5,
}  # fmt: skip
ACTION_NAMES = list(ACTION_WEIGHTS)
ACTION_CUM = list(itertools.accumulate(ACTION_WEIGHTS.values()))
MP_EVENTS = ["$MPViewScreen"] * 6 + ["$MPClick"] * 3 + ["$MPShow", "$MPLaunch", "$MPHide", "buttonClick",
                                                        "buttonClick", "addToCart", "payOrder", "search"]
WEB_EVENTS = ["$pageview"] * 6 + ["$WebClick"] * 3 + ["$WebStay", "buttonClick", "buttonClick", "addToCart",
                                                      "search"]
PATHS = ["pages/index/index", "pages/goods/detail", "pages/cart/cart", "pages/order/list", "pages/me/me",
         "pages/search/result", "pages/activity/spring"]
REFERRERS = ["直接打开", "pages/index/index", "pages/goods/detail", "扫一扫", "分享卡片"]
TITLES = ["首页", "商品详情", "购物车", "我的订单", "个人中心", "Home", "Spring sale"]
BIND_KEYS = ["$identity_mobile", "$identity_email"]
BAD_KEYS = ["1abc", "mobile-no", "$identity mobile", "邮箱"]
UNKNOWN_PLATFORMS = ["mp-tiktok", "android", "mp-weibo"]
BAD_KINDS = ("not_json", "not_utf8", "unknown_platform", "invalid_key", "missing_field", "not_object",
             "invalid_auth_state", "empty_value")


@dataclass(slots=True)
class Device:
    device_id: str
    platform: str
    user: str  # the login ID of the person on this device
    # the generator's view of the device, only to keep the actions plausible (unbind what was bound, ...)
    login_key: str | None = None
    bound: dict[str, str] = field(default_factory=dict)


def make_device_id(rng: random.Random, platform_name: str) -> str:
    if platform_name == "web":  # the Web JS SDK's cookie ID
        return (f"{rng.getrandbits(56):014x}-{rng.getrandbits(64):016x}-{rng.getrandbits(32):08x}-"
                f"{rng.choice(('1296000', '2073600', '3686400'))}-{rng.getrandbits(56):014x}")
    # the mini programs' default ID: a time, two random parts and a counter
    return (f"{T0_MS - rng.randrange(90 * 86_400_000)}-{rng.randrange(10**7):07d}-{rng.getrandbits(60):015x}-"
            f"{rng.randrange(10**8):08d}")


def make_devices(rng: random.Random, count: int) -> list[Device]:
    names = list(PLATFORM_WEIGHTS)
    platforms = rng.choices(names, weights=[PLATFORM_WEIGHTS[n] for n in names], k=count)
    users = max(1, count // 2)  # some people use several devices
    seen: set[str] = set()
    devices = []
    for p in platforms:
        device_id = make_device_id(rng, p)
        while device_id in seen:
            device_id = make_device_id(rng, p)
        seen.add(device_id)
        devices.append(Device(device_id, p, str(60_000_000_000_000_000 + rng.randrange(users) * 7919)))
    return devices


def phone(rng: random.Random) -> str:
    return f"1{rng.choice('3578')}{rng.randrange(10)}****{rng.randrange(10_000):04d}"


def email(rng: random.Random) -> str:
    return f"u{rng.randrange(10**6)}@example.com"


def key_value(rng: random.Random, key: str) -> str:
    return phone(rng) if key == "$identity_mobile" else email(rng)


def track_fields(rng: random.Random, device: Device) -> tuple[str, dict[str, Any] | None]:
    if device.platform == "web":
        event = rng.choice(WEB_EVENTS)
        props: dict[str, Any] = {"$url": f"https://shop.example.com/{rng.choice(PATHS)}",
                                 "$title": rng.choice(TITLES), "$timezone_offset": -480}
    else:
        event = rng.choice(MP_EVENTS)
        props = {"$url_path": rng.choice(PATHS), "$referrer": rng.choice(REFERRERS), "$title": rng.choice(TITLES)}
        if event == "$MPLaunch":
            props["$scene"] = f"a{1000 + rng.randrange(200)}"
    if not event.startswith("$"):
        props["product_id"] = f"sku-{rng.randrange(50_000)}"
        props["price"] = round(rng.uniform(1, 500), 2)
    if rng.random() < 0.05:
        return event, None
    return event, props


def log_in(device: Device, key: str | None) -> None:
    """The generator's view after a login (`key`) or a logout (None): nothing bound any more."""
    device.login_key = key
    device.bound.clear()


def customer_ids(rng: random.Random, device: Device, rec: dict[str, Any]) -> None:
    r = rng.random()
    if r < 0.4:  # the login bridge: AUTHENTICATED userid logs in
        rec["customer_ids"] = {"userid": {"id": device.user, "authState": "AUTHENTICATED"}}
        log_in(device, "$identity_login_id")
    elif r < 0.6:  # and LOGGED_OUT logs out
        rec["customer_ids"] = {"userid": {"id": device.user, "authState": "LOGGED_OUT"}}
        log_in(device, None)
    elif r < 0.85:
        rec["customer_ids"] = {"dpuuid": f"{rng.getrandbits(128):032x}"}
    else:
        rec["customer_ids"] = {"email": {"id": email(rng), "authState": 1}}
        rec["hash"] = "SHA-256"


def valid_record(rng: random.Random, device: Device, t: int) -> dict[str, Any]:
    """One valid raw record for this device, its action drawn from ACTION_WEIGHTS, plausible for its state."""
    rec: dict[str, Any] = {"device_id": device.device_id, "platform": device.platform}
    associates = device.platform not in NO_ASSOCIATION
    action = ACTION_NAMES[bisect.bisect(ACTION_CUM, rng.random() * ACTION_CUM[-1])]
    if action in ("bind", "unbind", "reset_anonymous_id") and not associates:
        action = "track"
    if action == "track":
        if rng.random() < 0.8:  # `action` defaults to track: some producers leave it out
            rec["action"] = "track"
        rec["event"], props = track_fields(rng, device)
        if props is not None:
            rec["properties"] = props
    else:
        rec["action"] = action
    if action == "login":
        if associates and rng.random() < 0.25:  # loginWithKey
            rec["key"] = rng.choice(BIND_KEYS)
            rec["id"] = key_value(rng, rec["key"])
            log_in(device, rec["key"])
        else:
            rec["id"] = device.user
            log_in(device, "$identity_login_id")
    elif action == "logout":
        log_in(device, None)
    elif action == "identify":
        if device.platform != "web" or rng.random() < 0.8:  # the Web SDK generates one when none is given
            rec["id"] = f"oX{rng.getrandbits(104):026x}"  # a WeChat openid-like ID
    elif action == "reset_anonymous_id":
        if rng.random() < 0.5:  # else a generated UUIDv5: the same input must give the same ID
            rec["id"] = f"reset-{rng.getrandbits(48):012x}"
    elif action == "bind":
        key = rng.choice([k for k in BIND_KEYS if k != device.login_key])  # binding the login's key is refused
        rec["key"] = key
        rec["value"] = device.bound[key] = key_value(rng, key)
    elif action == "unbind":
        if device.bound and rng.random() < 0.8:
            rec["key"] = rng.choice(sorted(device.bound))
            rec["value"] = device.bound.pop(rec["key"])
        else:
            rec["key"], rec["value"] = "$identity_mobile", phone(rng)
    elif action == "set_customer_ids":
        customer_ids(rng, device, rec)
    elif action == "profile_set":
        rec["properties"] = {"city": rng.choice(["上海", "北京", "深圳", "杭州"]), "vip_level": rng.randrange(5),
                             "gender": rng.choice(["f", "m"])}
    rec["time"] = t
    return rec


def bad_record(rng: random.Random, device: Device, t: int) -> bytes:
    """One bad raw record of a kind of BAD_KINDS: rejected at the byte level (no key: it lands in any
    partition) or by the engine."""
    kind = rng.choice(BAD_KINDS)
    base = {"device_id": device.device_id, "platform": device.platform, "action": "track",
            "event": "$pageview" if device.platform == "web" else "$MPViewScreen", "time": t}
    if kind == "not_json":
        text = orjson.dumps({**base, "properties": {"$title": rng.choice(TITLES)}}).decode()
        return text[: rng.randrange(len(text) // 2, len(text) - 1)].encode()  # cut in characters, not bytes
    if kind == "not_utf8":
        return orjson.dumps(base)[:-1] + b', "note": "\xff\xfe\xc3"}'
    if kind == "unknown_platform":
        return orjson.dumps({**base, "platform": rng.choice(UNKNOWN_PLATFORMS)})
    if kind == "invalid_key":
        # bind checks the association first, login checks the key first: both end on the key
        action = "login" if device.platform in NO_ASSOCIATION else "bind"
        return orjson.dumps({**base, "action": action, "key": rng.choice(BAD_KEYS), "id": device.user,
                             "value": phone(rng)})
    if kind == "missing_field":
        return orjson.dumps({k: v for k, v in base.items() if k != "device_id"})
    if kind == "not_object":
        return orjson.dumps([device.device_id, t])
    if kind == "invalid_auth_state":
        return orjson.dumps({**base, "action": "set_customer_ids",
                             "customer_ids": {"userid": {"id": device.user, "authState": 3}}})
    return orjson.dumps({**base, "event": ""})  # empty_value


def record_line(rng: random.Random, device: Device, i: int, bad_rate: float, tag: bool = False) -> bytes:
    """Record number `i` of a stream, for `device`: its time its own (T0 + 7 ms a record, jittered)."""
    t = T0_MS + i * 7 + rng.randrange(7)
    if rng.random() < bad_rate:
        return bad_record(rng, device, t)
    rec = valid_record(rng, device, t)
    if tag:
        rec.setdefault("properties", {})["bench_seq"] = i
    return orjson.dumps(rec)


def skewed_picks(rng: random.Random, records: int, devices: int) -> list[int]:
    """The device of each record: devices' activity is skewed (log-normal)."""
    weights = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in range(devices)))
    return rng.choices(range(devices), cum_weights=weights, k=records)


def write_lines(path: Path, lines: Any) -> Path:
    """The lines to `path` through a partial file, so that a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb", buffering=1 << 20) as f:
        for line in lines:
            f.write(line + b"\n")
    partial.rename(path)
    return path


def generate(path: Path, records: int, devices: int, seed: int, *, bad_rate: float = BAD_RATE,
             tag: bool = False) -> Path:
    """Write `records` raw records over `devices` devices to `path` (kept: the same arguments give the same
    bytes, so a later run reuses it). `tag` puts each valid record's number in its properties as
    `bench_seq`, for the latency measurement."""
    if path.exists():
        return path
    rng = random.Random(seed)
    devs = make_devices(rng, devices)
    picks = skewed_picks(rng, records, devices)
    return write_lines(path, (record_line(rng, devs[d], i, bad_rate, tag) for i, d in enumerate(picks)))


def input_path(folder: Path, kind: str, records: int, devices: int, seed: int) -> Path:
    return folder / f"input-{kind}-n{records}-d{devices}-s{seed}-v{GENERATOR_VERSION}.jsonl"


def read_lines(path: Path) -> list[bytes]:
    """The non-blank lines, bytes unchanged: what `replay` and `produce_file` take as records."""
    return [line for line in path.read_bytes().split(b"\n") if line.strip()]


def write_prefix(src: Path, dst: Path, count: int) -> None:
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.writelines(itertools.islice(f, count))


# -- populations too large to hold (make bench-scale) --------------------------------------------------------

_PLATFORM_NAMES = list(PLATFORM_WEIGHTS)
_PLATFORM_CUM = list(itertools.accumulate(PLATFORM_WEIGHTS.values()))


def scale_device(seed: int, i: int) -> Device:
    """Device number `i` of a population too large to hold (10M `Device`s would take gigabytes): drawn from a
    hash of (seed, i), so the preload and the records over it agree without keeping the devices. IDs shaped
    as `make_device_id`'s, the device number at the end keeping them apart."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=32).digest(), "little")
    platform_name = _PLATFORM_NAMES[bisect.bisect(_PLATFORM_CUM, (h & 0xFFFF) / 0x10000 * _PLATFORM_CUM[-1])]
    h >>= 16
    if platform_name == "web":
        device_id = (f"{h & (1 << 56) - 1:014x}-{h >> 56 & (1 << 64) - 1:016x}-{h >> 120 & 0xFFFFFFFF:08x}-"
                     f"{('1296000', '2073600', '3686400')[h >> 152 & 1]}-{i:x}")
    else:
        device_id = (f"{T0_MS - h % (90 * 86_400_000)}-{h >> 40 & 0xFFFFFF:07d}-{h >> 64 & (1 << 60) - 1:015x}-"
                     f"{i:08d}")
    return Device(device_id, platform_name, str(60_000_000_000_000_000 + i * 7919), "$identity_login_id")


def generate_preload(path: Path, devices: int, seed: int) -> Path:
    """One login per device of the population: every device then has a stored state."""
    if path.exists():
        return path
    return write_lines(path, (orjson.dumps({"device_id": d.device_id, "platform": d.platform, "action": "login",
                                            "id": d.user, "time": T0_MS - 86_400_000 + i})
                              for i, d in ((i, scale_device(seed, i)) for i in range(devices))))


def generate_over(path: Path, records: int, devices: int, seed: int) -> Path:
    """`records` records over the population of `generate_preload(devices, seed)`, with `generate`'s mix and
    skew; only the devices drawn are built."""
    if path.exists():
        return path
    rng = random.Random(seed + 1)
    picks = skewed_picks(rng, records, devices)
    devs: dict[int, Device] = {}

    def device(d: int) -> Device:
        found = devs.get(d)
        if found is None:
            found = devs[d] = scale_device(seed, d)
        return found

    return write_lines(path, (record_line(rng, device(d), i, BAD_RATE) for i, d in enumerate(picks)))
