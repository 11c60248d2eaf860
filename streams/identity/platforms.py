"""The platform table: one row per SDK build the product understands.

Lives here: each platform's default identity key, whether it has global user association, and the identity
keys it refuses per action beyond the common ones. Adding a platform is adding a row. Nothing here decides
what an action does; `actions.py` reads these rows.
"""

from __future__ import annotations

from dataclasses import dataclass

LOGIN_KEY = "$identity_login_id"
ANONYMOUS_KEY = "$identity_anonymous_id"


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    name: str
    # the key of the device's default ID in `identities`; None: no global user association (no identities,
    # bind/unbind/reset refused, logins only under $identity_login_id)
    default_key: str | None
    # Sensors' Web JS SDK rules (numbers as IDs, trimming, no length bound, its own no-op and logout tests)
    web: bool = False
    # refused on top of $identity_anonymous_id and the default key
    login_refused: frozenset[str] = frozenset()
    # refused on top of $identity_login_id, $identity_anonymous_id, the default key and the current login key
    bind_refused: frozenset[str] = frozenset()

    @property
    def associates(self) -> bool:
        return self.default_key is not None


def _mini(name: str, default_key: str | None) -> Platform:
    return Platform(name=name, default_key=default_key)


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            name="mp-wechat",
            default_key="$identity_mp_id",
            login_refused=frozenset(
                {"$mp_id", "$mp_openid", "$identity_mp_openid", "$identity_mp_unionid", "$mp_unionid"}
            ),
            bind_refused=frozenset({"$mp_id"}),
        ),
        _mini("mp-alipay", "$identity_ali_mp_id"),
        _mini("mp-baidu", "$identity_baidu_mp_id"),
        _mini("mp-bytedance", "$identity_byte_mp_id"),
        _mini("mp-feishu", "$identity_feishu_mp_id"),
        _mini("mp-taobao", "$identity_taobao_uuid"),
        _mini("mp-xiaohongshu", "$identity_xhs_mp_id"),
        # the seed lists these three without global user association (the QQ build ships it anyway)
        _mini("mp-jd", None),
        _mini("mp-kuaishou", None),
        _mini("mp-qq", None),
        Platform(name="web", default_key="$identity_cookie_id", web=True),
    )
}
