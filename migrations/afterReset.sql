-- keytrack: database privileges, as a superuser connected to keytrack's database,
-- after roles.sql (graphile-migrate runs both after `reset`; the service runs them
-- before `migrate`). Idempotent, and changes only what differs, so that the
-- owner alone can re-run it once a superuser has run it.

-- Service replicas starting together run this file at the same time: take turns.
select pg_advisory_xact_lock(hashtext('keytrack afterReset.sql'));

-- The owner owns the database and its public schema; nobody else may create in them.
grant all on database :DATABASE_NAME to :DATABASE_OWNER;
grant connect on database :DATABASE_NAME to keytrack_authenticator, keytrack_analyst;
revoke all on database :DATABASE_NAME from public;
do $$
begin
  if (select nspowner::regrole::text from pg_namespace where nspname = 'public') <> ':DATABASE_OWNER' then
    alter schema public owner to :DATABASE_OWNER;
  end if;
end
$$;
revoke create on schema public from public;
grant usage on schema public to keytrack_authenticator, keytrack_analyst, keytrack_admin, keytrack_user;
