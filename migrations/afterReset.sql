-- keytrack: database privileges, as a superuser connected to keytrack's database,
-- after roles.sql (graphile-migrate runs both after `reset`; the service runs them
-- before `migrate`). Idempotent.

-- The owner owns the database's schema; nobody else may create in it.
grant all on database :DATABASE_NAME to :DATABASE_OWNER;
grant connect on database :DATABASE_NAME to keytrack_authenticator, keytrack_analyst;
revoke all on database :DATABASE_NAME from public;
alter schema public owner to :DATABASE_OWNER;
revoke all on schema public from public;
grant usage on schema public to keytrack_authenticator, keytrack_analyst, keytrack_admin, keytrack_user;
