"""Local users and the roles they can be given."""

from __future__ import annotations

import attrs
from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody

from nxmesh.core.errors import Problem, ValidationError
from nxmesh.core.records import User
from nxmesh.master.api._common import BEARER, ERRORS, Name, perm
from nxmesh.master.api.context import CallerDep
from nxmesh.master.api.schemas import RoleView, UserCreate, UserUpdate, UserView
from nxmesh.master.auth.errors import PermissionDeniedError
from nxmesh.master.auth.passwords import check_password_policy
from nxmesh.master.problems import Conflict, NotFound

__all__ = ["RoleController", "UserController"]


def _view(user: User) -> UserView:
    return UserView(username=user.username, roles=tuple(user.roles), disabled=user.disabled)


def _check_roles(caller: CallerDep, roles: tuple[str, ...]) -> None:
    rbac = caller.services.rbac
    problems: list[Problem] = []
    for i, binding in enumerate(roles):
        reason = rbac.check_binding(binding)
        if reason is not None:
            problems.append(Problem(f"roles[{i}]", reason))
            continue
        # No escalation: grant only what the caller could do itself.
        if not rbac.holds_all(caller.principal, [binding]):
            problems.append(
                Problem(f"roles[{i}]", f"{binding!r} grants permissions you do not hold")
            )
    if problems:
        raise ValidationError(problems)


def _check_may_manage(caller: CallerDep, user: User) -> None:
    """Only a caller holding every permission of `user` may change or delete it: setting
    its password or disabling it is as good as holding its roles."""
    if not caller.services.rbac.holds_all(caller.principal, user.roles):
        raise PermissionDeniedError.to_manage(user.username)


def _is_admin(user: User) -> bool:
    return not user.disabled and "admin" in user.roles


async def _keep_an_admin(caller: CallerDep, before: User, after: User | None) -> None:
    if not _is_admin(before) or (after is not None and _is_admin(after)):
        return
    admins = [u for u in await caller.services.storage.list_users() if _is_admin(u)]
    if len(admins) <= 1:
        raise Conflict(f"{before.username!r} is the last enabled admin; make another first")


class UserController(Controller):
    """Users of the master API (passwords are stored as argon2id hashes only)."""

    path = "/users"
    tags = ("users",)
    security = BEARER

    @get("/", opt=perm("user:read"), responses=ERRORS)
    async def list_users(self, caller: CallerDep) -> list[UserView]:
        return [_view(u) for u in await caller.services.storage.list_users()]

    @get("/{username:str}", opt=perm("user:read"), responses=ERRORS)
    async def get_user(self, username: Name, caller: CallerDep) -> UserView:
        user = await caller.services.storage.get_user(username)
        if user is None:
            raise NotFound(f"no user {username!r}")
        return _view(user)

    @post("/", opt=perm("user:write"), responses=ERRORS)
    async def create_user(self, data: JSONBody[UserCreate], caller: CallerDep) -> UserView:
        """Create a user (409 when the name is taken)."""
        s = caller.services
        check_password_policy(data.password)
        _check_roles(caller, data.roles)
        if await s.storage.get_user(data.username) is not None:
            raise Conflict(f"user {data.username!r} exists")
        # A new user starts with no API tokens, even if an old one of the same name left
        # some behind (deleted before deletions revoked them).
        await s.auth.revoke_api_tokens_of(data.username)
        password_hash = await s.auth.passwords.hash_in_thread(data.password)
        user = User(username=data.username, password_hash=password_hash, roles=data.roles)
        await s.storage.put_user(user)
        await caller.audit("user.create", f"users/{user.username}", roles=list(user.roles))
        return _view(user)

    @patch("/{username:str}", opt=perm("user:write"), responses=ERRORS)
    async def update_user(
        self, username: Name, data: JSONBody[UserUpdate], caller: CallerDep
    ) -> UserView:
        """Change roles, disable or enable, or set a new password (ends the user's sessions)."""
        s = caller.services
        user = await s.storage.get_user(username)
        if user is None:
            raise NotFound(f"no user {username!r}")
        _check_may_manage(caller, user)
        if data.roles is not None:
            _check_roles(caller, data.roles)
        new_hash = None
        if data.password is not None:
            check_password_policy(data.password)
            new_hash = await s.auth.passwords.hash_in_thread(data.password)
            # Hashing took a while: build on the user as it is now, not as first read,
            # so another change made meanwhile is not written back over.
            user = await s.storage.get_user(username)
            if user is None:
                raise NotFound(f"no user {username!r}")
            _check_may_manage(caller, user)
        updated = user
        if data.roles is not None:
            updated = attrs.evolve(updated, roles=data.roles)
        if data.disabled is not None:
            updated = attrs.evolve(updated, disabled=data.disabled)
        if new_hash is not None:
            updated = attrs.evolve(updated, password_hash=new_hash)
        await _keep_an_admin(caller, user, updated)
        await s.storage.put_user(updated)
        if data.password is not None or data.disabled or data.roles is not None:
            await s.auth.end_sessions(username)
        if data.password is not None:
            # A new password ends every credential made with the old one (see
            # `AuthController.change_password`): API tokens too.
            await s.auth.revoke_api_tokens_of(username)
        await caller.audit(
            "user.update",
            f"users/{username}",
            roles=list(updated.roles),
            disabled=updated.disabled,
            login_changed=data.password is not None,
        )
        return _view(updated)

    @delete("/{username:str}", opt=perm("user:write"), responses=ERRORS)
    async def delete_user(self, username: Name, caller: CallerDep) -> None:
        """Delete a user and end its sessions (its API tokens stop working too)."""
        s = caller.services
        user = await s.storage.get_user(username)
        if user is None:
            raise NotFound(f"no user {username!r}")
        _check_may_manage(caller, user)
        await _keep_an_admin(caller, user, None)
        # Tokens first: a token outliving its owner would come back with a new user of
        # the same name. Should this fail, the user is still there to delete again.
        await s.auth.revoke_api_tokens_of(username)
        await s.storage.delete_user(username)
        await s.auth.end_sessions(username)
        await caller.audit("user.delete", f"users/{username}")


class RoleController(Controller):
    """Built-in and custom roles (custom ones come from ``[auth.roles]``)."""

    path = "/roles"
    tags = ("users",)
    security = BEARER

    @get("/", opt=perm("role:read"), responses=ERRORS)
    async def list_roles(self, caller: CallerDep) -> list[RoleView]:
        rbac = caller.services.rbac
        return [
            RoleView(name=name, builtin=rbac.is_builtin(name), permissions=tuple(map(str, grants)))
            for name, grants in rbac.roles.items()
        ]
