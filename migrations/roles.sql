-- keytrack: the cluster-wide roles.
--
-- Roles belong to the cluster, not to a database, so they cannot be created by a
-- migration (a second database on the same cluster would fail, and `reset` would
-- not recreate them). This file runs as a superuser: graphile-migrate runs it after
-- `reset` (before afterReset.sql), and the service runs both, with the same
-- placeholders, before `migrate`. Every statement is idempotent.

-- Several processes may prepare databases at once (tests, a second replica):
-- take turns, and change a role only when it differs, so that concurrent runs
-- never update the same catalog row.
select pg_advisory_xact_lock(hashtext('keytrack roles.sql'));

do $$
begin
  -- Owns the schema: migrations run as this role.
  if not exists (select 1 from pg_roles where rolname = 'keytrack_owner') then
    create role keytrack_owner login;
  end if;
  -- The service's login for PostGraphile. NOINHERIT: it has no privileges of its
  -- own and gains them only by SET ROLE to one of the roles granted to it.
  if not exists (select 1 from pg_roles where rolname = 'keytrack_authenticator') then
    create role keytrack_authenticator login noinherit;
  end if;
  -- Admins (ADMIN_API_KEY, or a key of a user whose role is 'admin').
  if not exists (select 1 from pg_roles where rolname = 'keytrack_admin') then
    create role keytrack_admin nologin;
  end if;
  -- A user authenticated by their own API key: row-level security limits them to
  -- their own user, keys and requests.
  if not exists (select 1 from pg_roles where rolname = 'keytrack_user') then
    create role keytrack_user nologin;
  end if;
  -- Read-only role for DBAs and analysts in psql.
  if not exists (select 1 from pg_roles where rolname = 'keytrack_analyst') then
    create role keytrack_analyst login;
  end if;
end
$$;

do $$
begin
  if (select rolinherit from pg_roles where rolname = 'keytrack_authenticator') then
    alter role keytrack_authenticator noinherit;
  end if;
  if not pg_has_role('keytrack_authenticator', 'keytrack_admin', 'MEMBER') then
    grant keytrack_admin to keytrack_authenticator;
  end if;
  if not pg_has_role('keytrack_authenticator', 'keytrack_user', 'MEMBER') then
    grant keytrack_user to keytrack_authenticator;
  end if;
  -- The analyst's search_path makes the spec's SQL (which names
  -- chat_completion_requests and api_key_tracking_quality unqualified) run
  -- verbatim, and every transaction of theirs is read-only.
  if not exists (select 1 from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
                  where r.rolname = 'keytrack_analyst' and s.setdatabase = 0
                    and s.setconfig @> array['search_path=app_public, public', 'default_transaction_read_only=on']) then
    alter role keytrack_analyst set search_path = app_public, public;
    alter role keytrack_analyst set default_transaction_read_only = on;
  end if;
end
$$;

-- The owner administers what it owns: it may act as an admin in SQL (psql, the
-- worker) without switching roles.
do $$
begin
  if not pg_has_role(':DATABASE_OWNER', 'keytrack_admin', 'MEMBER') then
    grant keytrack_admin to :DATABASE_OWNER;
  end if;
end
$$;
