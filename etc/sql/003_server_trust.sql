-- Migration 3: least privilege on the pooled PEM server.
--
-- What changes, and why (SECURITY.md has the whole model):
-- - Agents hold no table privileges any more. They call SECURITY DEFINER functions only, and
--   every write (heartbeat, samples) carries an HMAC-SHA256 made with a 32-byte secret that
--   registration gives each agent, so an agent cannot write as another even though many share
--   one login through pgBouncer.
-- - The functions that write probe data and heartbeats belong to pem_writer, a NOLOGIN role
--   holding exactly the table rights those writes need, not to the superuser.
-- - Agent roles are created and dropped only by superuser-owned functions that act on the roles
--   they created themselves (pem.agent_role), so the PEM admin needs no CREATEROLE, which on
--   PostgreSQL 15 and older is superuser-equivalent.
-- - pgBouncer's auth query hands out no usable secret when pgBouncer reaches PostgreSQL over
--   its Unix socket by peer authentication (pem.pooler_config.server_login = 'peer'); the ident
--   map that makes this work is kept by pem.sync_pooler_ident().
-- - The signer's CA paths and validity come from the server's configuration files only.
--
-- Conventions as in migration 1: every SECURITY DEFINER function pins search_path to
-- pg_catalog, pg_temp. pg_temp is never searched for functions or operators, so operators need
-- no qualification; every table is schema-qualified. PL/pgSQL bodies pin variable_conflict,
-- which a session could otherwise change for the functions it compiles.

-- ---------------------------------------------------------------------------------------------
-- 1. Roles and the database
-- ---------------------------------------------------------------------------------------------

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pem_writer') THEN
        -- Owns the data-writing functions; nobody logs in as it or is a member of it.
        CREATE ROLE pem_writer NOLOGIN NOINHERIT;
    END IF;
    -- Temporary tables would let a session shadow unqualified names and outlive a pooled
    -- transaction; nothing here needs them.
    EXECUTE pg_catalog.format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', pg_catalog.current_database());
END
$roles$;

-- HMAC and random bytes come from pgcrypto. It is created in its own schema unless the database
-- already has it somewhere; the wrappers below find it either way.
CREATE SCHEMA IF NOT EXISTS pem_crypto;
REVOKE ALL ON SCHEMA pem_crypto FROM PUBLIC;
DO $crypto$
DECLARE
    v_schema name;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pgcrypto') THEN
        CREATE EXTENSION pgcrypto SCHEMA pem_crypto;
    END IF;
    SELECT n.nspname INTO v_schema
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'pgcrypto';
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pem.hmac_sha256(p_data bytea, p_key bytea) RETURNS bytea
         LANGUAGE sql IMMUTABLE STRICT AS %L',
        pg_catalog.format('SELECT %I.hmac($1, $2, ''sha256'')', v_schema));
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pem.random_bytes(p_count integer) RETURNS bytea
         LANGUAGE sql VOLATILE STRICT AS %L',
        pg_catalog.format('SELECT %I.gen_random_bytes($1)', v_schema));
END
$crypto$;
REVOKE ALL ON FUNCTION pem.hmac_sha256(bytea, bytea), pem.random_bytes(integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- 2. Server-side state only the definer functions read (no grants at all)
-- ---------------------------------------------------------------------------------------------

-- How pgBouncer reaches PostgreSQL, written by `pemworker pooler prepare-server`.
CREATE TABLE pem.pooler_config (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- 'peer': over the Unix socket as pgBouncer's OS user (ident map), no password involved;
    -- 'md5': with the md5 secret the auth query returns (the guide; a pgBouncer on another host).
    server_login      text    NOT NULL DEFAULT 'md5' CHECK (server_login IN ('peer', 'md5')),
    pgbouncer_os_user text    CHECK (pgbouncer_os_user ~ '^[A-Za-z_][A-Za-z0-9_.-]*$'),
    pgbouncer_address cidr,                 -- a pgBouncer on another host; NULL = this host's socket
    ident_map         text    NOT NULL DEFAULT 'pemworker' CHECK (ident_map ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    auth_user         name,
    admin_user        name
);
INSERT INTO pem.pooler_config DEFAULT VALUES;

-- Every role the agent-role functions created (or adopted from a server prepared by the guide).
-- Identity is oid and name together, so a role dropped and recreated by hand is not ours.
CREATE TABLE pem.agent_role (
    role_oid   oid         PRIMARY KEY,
    role_name  name        NOT NULL UNIQUE,
    agent_id   integer,                      -- set for a dedicated agent<ID> role
    -- What pg_authid.rolpassword must be: NULL with peer logins, else the md5 secret.
    password   text,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    adopted    boolean     NOT NULL DEFAULT false
);

-- Per-agent write secrets (32 random bytes). last_sent_at guards heartbeats against replay.
CREATE TABLE pem.agent_secret (
    agent_id     integer     PRIMARY KEY REFERENCES pem.agent (id) ON DELETE CASCADE,
    secret       bytea       NOT NULL CHECK (pg_catalog.octet_length(secret) = 32),
    issued_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_sent_at timestamptz
);
REVOKE ALL ON pem.pooler_config, pem.agent_role, pem.agent_secret FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- 3. Agents lose every table privilege; pem_writer gets what writing needs
-- ---------------------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA pem, pemdata, pemhistory FROM pem_agent;
REVOKE ALL ON SCHEMA pemdata, pemhistory FROM pem_agent;
DROP FUNCTION pem.record_heartbeat(integer, text);

GRANT USAGE ON SCHEMA pem, pemdata, pemhistory TO pem_writer;
-- Latest values are upserted and pruned; history is append-only even for the writer (SELECT
-- because INSERT ... ON CONFLICT (delivery_key) reads the key).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pemdata TO pem_writer;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA pemhistory TO pem_writer;
GRANT SELECT ON pem.agent TO pem_writer;
GRANT SELECT, INSERT, UPDATE ON pem.agent_heartbeat TO pem_writer;

-- ---------------------------------------------------------------------------------------------
-- 4. Agent roles: created, recorded, repaired and dropped only here
-- ---------------------------------------------------------------------------------------------

-- Roles made by the guide's pem.create_proxy_agent_user (before this migration) are adopted when
-- they are plain agent logins: members of pem_agent and pem_agent_pool and of nothing else.
INSERT INTO pem.agent_role (role_oid, role_name, agent_id, password, adopted)
SELECT a.oid, a.rolname,
       (SELECT g.id FROM pem.agent g WHERE 'agent' || g.id::text = a.rolname),
       a.rolpassword, true
  FROM pg_catalog.pg_authid a
 WHERE a.rolcanlogin AND NOT a.rolsuper AND NOT a.rolcreaterole AND NOT a.rolcreatedb
   AND NOT a.rolreplication AND NOT a.rolbypassrls
   AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                WHERE m.member = a.oid AND m.roleid = 'pem_agent'::regrole)
   AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                WHERE m.member = a.oid AND m.roleid = 'pem_agent_pool'::regrole)
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    WHERE m.member = a.oid
                      AND m.roleid NOT IN ('pem_agent'::regrole, 'pem_agent_pool'::regrole));

-- A name the agent-role functions accept: what CREATE ROLE accepts, reported before any work.
CREATE FUNCTION pem.check_agent_user_name(p_name text)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
BEGIN
    -- NAMEDATALEN is 64: a longer name would be truncated silently into another role name.
    IF p_name IS NULL OR p_name = '' OR pg_catalog.octet_length(p_name) > 63 THEN
        RAISE EXCEPTION 'agent user name must be 1 to 63 bytes'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF pg_catalog.left(p_name, 3) = 'pg_' OR p_name = ANY (ARRAY['public', 'none']) THEN
        RAISE EXCEPTION 'agent user name "%" is reserved', p_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'role names starting with "pg_", public and none are reserved';
    END IF;
    -- The name goes into pg_ident.conf, which has no way to write a line break.
    IF p_name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'agent user name % contains a control character', pg_catalog.quote_literal(p_name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$fn$;

-- The ident map that lets pgBouncer's OS user log in as the auth user, the admin and each
-- pooled agent role over the Unix socket (PostgreSQL 15 cannot map to a group, so one line per
-- role). Rewrites only its own block of ident_file, atomically, checks that the server accepts
-- the file (pg_ident_file_mappings) and reloads; puts the old file back if not.
CREATE FUNCTION pem.sync_pooler_ident()
RETURNS boolean
LANGUAGE plpython3u
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
import os, stat, time

BEGIN = '# BEGIN pemworker: pgBouncer logs in as these roles by peer (pemworker pooler prepare-server)'
END = '# END pemworker'
LIMIT = 1 << 20

cfg = plpy.execute("SELECT server_login, pgbouncer_os_user, ident_map, auth_user::text AS auth_user,"
                   "       admin_user::text AS admin_user FROM pem.pooler_config")
if not cfg or cfg[0]['server_login'] != 'peer' or not cfg[0]['pgbouncer_os_user']:
    return False
cfg = cfg[0]
roles = [r['n'] for r in plpy.execute(
    "SELECT ar.role_name::text AS n FROM pem.agent_role ar"
    "  JOIN pg_catalog.pg_roles r ON r.oid = ar.role_oid AND r.rolname = ar.role_name ORDER BY 1")]
users = []
for u in [cfg['auth_user'], cfg['admin_user']] + roles:
    if u and u not in users:
        users.append(u)

def quote(token):
    # pg_hba/pg_ident tokens: double quotes keep the literal meaning, "" is a double quote.
    return '"' + token.replace('"', '""') + '"'

block = [BEGIN]
for u in users:
    block.append('%s %s %s' % (cfg['ident_map'], quote(cfg['pgbouncer_os_user']), quote(u)))
block.append(END)
block = '\n'.join(block) + '\n'

path = plpy.execute("SELECT pg_catalog.current_setting('ident_file') AS f")[0]['f']

def read(p):
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            plpy.error('%s is not a regular file' % p)
        data = os.read(fd, LIMIT + 1)
        if len(data) > LIMIT:
            plpy.error('%s is larger than %d bytes' % (p, LIMIT))
        return data.decode('utf-8'), st
    finally:
        os.close(fd)

def write(p, text, st):
    d = os.path.dirname(p)
    tmp = os.path.join(d, '.%s.pemworker-%d' % (os.path.basename(p), os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 stat.S_IMODE(st.st_mode))
    try:
        os.write(fd, text.encode('utf-8'))
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, p)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

try:
    old, st = read(path)
except OSError as e:
    plpy.error('cannot read the ident file %s: %s' % (path, e.strerror or e))
rest, inside, had_block = [], False, False
for line in old.splitlines(True):
    bare = line.rstrip('\r\n')
    if bare.startswith('# BEGIN pemworker'):
        inside, had_block = True, True
    elif inside and bare == END:
        inside = False
    elif not inside:
        rest.append(line)
new = block + ''.join(rest)
if new == old:
    return False
try:
    if not had_block:
        # The first change to a file we did not write: keep the original beside it.
        backup = '%s.%s.bak' % (path, time.strftime('%Y%m%dT%H%M%S'))
        write(backup, old, st)
    write(path, new, st)
except OSError as e:
    plpy.error('cannot update the ident file %s: %s' % (path, e.strerror or e),
               hint='the PostgreSQL server user must be able to write it and its directory')
errors = plpy.execute("SELECT pg_catalog.string_agg(pg_catalog.format('line %s: %s', line_number, error), '; ') AS e"
                      "  FROM pg_catalog.pg_ident_file_mappings WHERE error IS NOT NULL")[0]['e']
if errors:
    write(path, old, st)
    plpy.error('the server rejected the new ident file %s (%s); the old file was put back' % (path, errors))
plpy.execute("SELECT pg_catalog.pg_reload_conf()")
return True
$fn$;
REVOKE ALL ON FUNCTION pem.sync_pooler_ident() FROM PUBLIC;

-- Creates (or finds) an agent role: a plain login in pem_agent and pem_agent_pool, recorded in
-- pem.agent_role. Returns true when it created the role. p_agent_id marks a dedicated agent<ID>.
-- Serialized by a lock on pem.agent_role, which agents cannot take (they have no rights on it),
-- so concurrent registrations never race on CREATE ROLE or GRANT ("tuple concurrently updated").
CREATE FUNCTION pem.ensure_agent_user(p_name text, p_agent_id integer DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_login    text;
    v_password text;
    v_oid      oid;
BEGIN
    PERFORM pem.check_agent_user_name(p_name);
    FOR attempt IN 1..2 LOOP
        IF EXISTS (SELECT 1 FROM pem.agent_role ar JOIN pg_catalog.pg_roles r
                       ON r.oid = ar.role_oid AND r.rolname = ar.role_name
                    WHERE ar.role_name::text = p_name) THEN
            RETURN false;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname::text = p_name) THEN
            -- Never adopt an unrelated role: its secret would reach pgBouncer's auth query.
            RAISE EXCEPTION 'role "%" already exists and is not a PEM agent user', p_name
                USING ERRCODE = 'duplicate_object',
                      HINT = 'choose another name for the agent user';
        END IF;
        EXIT WHEN attempt = 2;
        -- Someone may have created it meanwhile: look again once we hold the lock.
        LOCK TABLE pem.agent_role IN SHARE ROW EXCLUSIVE MODE;
    END LOOP;

    SELECT c.server_login INTO v_login FROM pem.pooler_config c;
    IF v_login = 'md5' THEN
        -- pgBouncer logs in with this secret (cert + auth_query cannot use SCRAM), so md5.
        -- Nobody types the password: 256 random bits.
        v_password := 'md5' || pg_catalog.md5(
            pg_catalog.encode(pem.random_bytes(32), 'hex') || p_name);
    END IF;
    EXECUTE pg_catalog.format(
        'CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD %L',
        p_name, v_password);
    EXECUTE pg_catalog.format('GRANT pem_agent, pem_agent_pool TO %I', p_name);
    SELECT r.oid INTO v_oid FROM pg_catalog.pg_roles r WHERE r.rolname::text = p_name;
    INSERT INTO pem.agent_role (role_oid, role_name, agent_id, password)
    VALUES (v_oid, p_name, p_agent_id, v_password);
    PERFORM pem.sync_pooler_ident();
    RETURN true;
END
$fn$;
REVOKE ALL ON FUNCTION pem.ensure_agent_user(text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.ensure_agent_user(text, integer) TO pem_admin;

-- The guide's step 6, same name and signature, now on top of ensure_agent_user.
CREATE OR REPLACE FUNCTION pem.create_proxy_agent_user(p_name varchar)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
BEGIN
    IF NOT pem.ensure_agent_user(p_name::text, NULL) THEN
        RAISE NOTICE 'agent user "%" already exists', p_name;
    END IF;
END
$fn$;

-- Drops an agent role the functions above made, unless an active agent still logs in as it.
CREATE FUNCTION pem.drop_agent_user(p_name text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_users integer[];
BEGIN
    LOCK TABLE pem.agent_role IN SHARE ROW EXCLUSIVE MODE;
    IF NOT EXISTS (SELECT 1 FROM pem.agent_role ar JOIN pg_catalog.pg_roles r
                       ON r.oid = ar.role_oid AND r.rolname = ar.role_name
                    WHERE ar.role_name::text = p_name) THEN
        RETURN false;
    END IF;
    SELECT pg_catalog.array_agg(a.id ORDER BY a.id) INTO v_users
      FROM pem.agent a
     WHERE a.active AND coalesce(a.agent_user::text, 'agent' || a.id::text) = p_name;
    IF v_users IS NOT NULL THEN
        RAISE EXCEPTION 'agent user "%" is still used by active agents %', p_name, v_users
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'unregister those agents first';
    END IF;
    EXECUTE pg_catalog.format('DROP ROLE %I', p_name);
    DELETE FROM pem.agent_role WHERE role_name::text = p_name;
    PERFORM pem.sync_pooler_ident();
    RETURN true;
END
$fn$;
REVOKE ALL ON FUNCTION pem.drop_agent_user(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.drop_agent_user(text) TO pem_admin;

-- Undoes what an agent may change about its own role for everyone who shares it: role-level
-- settings (ALTER ROLE CURRENT_USER SET ...) and its password (ALTER ROLE CURRENT_USER
-- PASSWORD ...). Called with every heartbeat, so a change lasts at most one heartbeat interval
-- of any agent; cheap when there is nothing to do. A repair that would wait (another session
-- repairs the same role right now) is left to the next heartbeat rather than delaying this one.
CREATE FUNCTION pem.repair_agent_roles()
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '200ms'
AS $fn$
#variable_conflict error
DECLARE
    r      record;
    v_done integer := 0;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pem.agent_role ar
          JOIN pg_catalog.pg_authid a ON a.oid = ar.role_oid AND a.rolname = ar.role_name
         WHERE a.rolpassword IS DISTINCT FROM ar.password
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s WHERE s.setrole = a.oid)) THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT a.rolname, ar.password, a.rolpassword IS DISTINCT FROM ar.password AS bad_password,
               pg_catalog.array_remove(pg_catalog.array_agg(s.setdatabase), NULL) AS databases
          FROM pem.agent_role ar
          JOIN pg_catalog.pg_authid a ON a.oid = ar.role_oid AND a.rolname = ar.role_name
          LEFT JOIN pg_catalog.pg_db_role_setting s ON s.setrole = a.oid
         GROUP BY a.rolname, ar.password, a.rolpassword
        HAVING a.rolpassword IS DISTINCT FROM ar.password OR pg_catalog.count(s.setrole) > 0
    LOOP
        BEGIN
            IF r.bad_password THEN
                EXECUTE pg_catalog.format('ALTER ROLE %I PASSWORD %L', r.rolname, r.password);
            END IF;
            FOR i IN 1..coalesce(pg_catalog.array_length(r.databases, 1), 0) LOOP
                IF r.databases[i] = 0 THEN
                    EXECUTE pg_catalog.format('ALTER ROLE %I RESET ALL', r.rolname);
                ELSE
                    EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I RESET ALL', r.rolname,
                        (SELECT d.datname FROM pg_catalog.pg_database d WHERE d.oid = r.databases[i]));
                END IF;
            END LOOP;
            RAISE LOG 'pemworker: repaired agent role % (password changed: %, role-level settings: %)',
                r.rolname, r.bad_password, coalesce(pg_catalog.array_length(r.databases, 1), 0);
            v_done := v_done + 1;
        EXCEPTION WHEN OTHERS THEN
            RAISE LOG 'pemworker: repairing agent role % postponed: %', r.rolname, SQLERRM;
        END;
    END LOOP;
    RETURN v_done;
END
$fn$;
REVOKE ALL ON FUNCTION pem.repair_agent_roles() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.repair_agent_roles() TO pem_writer;

-- How pgBouncer reaches PostgreSQL, for `pooler prepare-server` (superusers only). Aligns the
-- agent roles' passwords with it (none with peer, an md5 secret otherwise), repairs them, and
-- keeps the ident map. Returns one line per change.
CREATE FUNCTION pem.configure_pooler(p_server_login text, p_pgbouncer_os_user text,
                                     p_pgbouncer_address cidr, p_auth_user text,
                                     p_admin_user text, p_align_passwords boolean)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    r        record;
    v_before pem.pooler_config;
    v_after  pem.pooler_config;
BEGIN
    LOCK TABLE pem.agent_role IN SHARE ROW EXCLUSIVE MODE;
    SELECT * INTO v_before FROM pem.pooler_config;
    UPDATE pem.pooler_config
       SET server_login = p_server_login, pgbouncer_os_user = p_pgbouncer_os_user,
           pgbouncer_address = p_pgbouncer_address, auth_user = p_auth_user,
           admin_user = p_admin_user
    RETURNING * INTO v_after;
    IF v_before IS DISTINCT FROM v_after THEN
        RETURN NEXT pg_catalog.format('pgBouncer reaches PostgreSQL %s',
            CASE p_server_login WHEN 'peer'
                 THEN pg_catalog.format('over the Unix socket as OS user %s (peer, ident map %s)',
                                        p_pgbouncer_os_user, v_after.ident_map)
                 ELSE pg_catalog.format('from %s with the md5 secrets its auth query returns',
                                        p_pgbouncer_address) END);
    END IF;
    IF p_align_passwords THEN
        FOR r IN SELECT ar.role_name, a.rolpassword
                   FROM pem.agent_role ar
                   JOIN pg_catalog.pg_authid a ON a.oid = ar.role_oid AND a.rolname = ar.role_name
                  ORDER BY 1
        LOOP
            IF p_server_login = 'peer' AND (r.rolpassword IS NOT NULL) THEN
                EXECUTE pg_catalog.format('ALTER ROLE %I PASSWORD NULL', r.role_name);
                UPDATE pem.agent_role SET password = NULL WHERE role_name = r.role_name;
                RETURN NEXT pg_catalog.format(
                    'removed the password of agent user %s: pgBouncer logs in by peer, so no secret exists to steal',
                    r.role_name);
            ELSIF p_server_login = 'md5' AND (r.rolpassword IS NULL OR pg_catalog.left(r.rolpassword, 3) <> 'md5') THEN
                UPDATE pem.agent_role
                   SET password = 'md5' || pg_catalog.md5(pg_catalog.encode(pem.random_bytes(32), 'hex') || r.role_name::text)
                 WHERE role_name = r.role_name;
                EXECUTE pg_catalog.format('ALTER ROLE %I PASSWORD %L', r.role_name,
                    (SELECT ar.password FROM pem.agent_role ar WHERE ar.role_name = r.role_name));
                RETURN NEXT pg_catalog.format('gave agent user %s a new md5 secret for pgBouncer', r.role_name);
            ELSE
                UPDATE pem.agent_role SET password = r.rolpassword
                 WHERE role_name = r.role_name AND password IS DISTINCT FROM r.rolpassword;
            END IF;
        END LOOP;
        IF pem.repair_agent_roles() > 0 THEN
            RETURN NEXT 'removed role-level settings from agent roles';
        END IF;
    END IF;
    IF pem.sync_pooler_ident() THEN
        RETURN NEXT pg_catalog.format('updated the ident map %s in %s and reloaded the server',
            v_after.ident_map, pg_catalog.current_setting('ident_file'));
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION pem.configure_pooler(text, text, cidr, text, text, boolean) FROM PUBLIC;

-- pgBouncer's auth query, now answering only for roles the functions above made (recorded in
-- pem.agent_role) that are plain logins in pem_agent and pem_agent_pool and nothing else, and
-- with peer logins returning no secret at all.
CREATE OR REPLACE FUNCTION pem.get_agent_pool_auth(p_usename text)
RETURNS TABLE (usename name, passwd text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT a.rolname,
           CASE WHEN c.server_login = 'md5' THEN a.rolpassword END
      FROM pg_catalog.pg_authid a
      JOIN pem.agent_role ar ON ar.role_oid = a.oid AND ar.role_name = a.rolname
      CROSS JOIN pem.pooler_config c
     -- Compare as text: a cast to name would truncate a long input onto another role.
     WHERE a.rolname::text = p_usename
       AND a.rolcanlogin AND NOT a.rolsuper AND NOT a.rolreplication AND NOT a.rolbypassrls
       AND NOT a.rolcreaterole AND NOT a.rolcreatedb
       AND (a.rolvaliduntil IS NULL OR a.rolvaliduntil > pg_catalog.now())
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    WHERE m.member = a.oid AND m.roleid = 'pem_agent_pool'::regrole)
       -- Nothing else, not even indirectly (pem_agent and pem_agent_pool are members of nothing).
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                        WHERE (m.member = a.oid
                               AND m.roleid NOT IN ('pem_agent'::regrole, 'pem_agent_pool'::regrole))
                           OR m.member IN ('pem_agent'::regrole, 'pem_agent_pool'::regrole))
$fn$;

-- ---------------------------------------------------------------------------------------------
-- 5. Per-agent secrets and message authentication
-- ---------------------------------------------------------------------------------------------

-- Makes (or replaces, on re-registration) an agent's write secret; returns it in hex for the
-- registering host, which keeps it in a 0600 file. The server never hands it out again.
CREATE FUNCTION pem.issue_agent_secret(p_agent_id integer)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_secret bytea;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pem.agent a WHERE a.id = p_agent_id) THEN
        RAISE EXCEPTION 'no agent % is registered', p_agent_id USING ERRCODE = 'no_data_found';
    END IF;
    v_secret := pem.random_bytes(32);
    INSERT INTO pem.agent_secret AS s (agent_id, secret) VALUES (p_agent_id, v_secret)
    ON CONFLICT (agent_id) DO UPDATE SET secret = EXCLUDED.secret, issued_at = pg_catalog.now();
    RETURN pg_catalog.encode(v_secret, 'hex');
END
$fn$;
REVOKE ALL ON FUNCTION pem.issue_agent_secret(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.issue_agent_secret(integer) TO pem_admin;

-- Checks that a message comes from the agent whose id it carries: HMAC-SHA256 (hex) with the
-- agent's secret over "<kind>\n<agent_id>\n<sent_at>\n<payload>". Heartbeats must also be fresh
-- (within 300 s of this server's clock) and newer than the last one accepted, so a captured
-- heartbeat cannot be replayed; samples carry delivery keys, so a replayed batch stores nothing.
-- Refusals are SQLSTATE 28000: the data is fine, the credentials are not.
CREATE FUNCTION pem.authenticate_agent(p_kind text, p_agent_id integer, p_sent_at text,
                                       p_payload text, p_mac text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_secret   bytea;
    v_expected text;
    v_sent     timestamptz;
    v_skew     double precision;
BEGIN
    SELECT s.secret INTO v_secret FROM pem.agent_secret s WHERE s.agent_id = p_agent_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % has no write secret on this PEM server', p_agent_id
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'an agent registered before per-agent secrets, or unregistered: register it again with --register-agent --force-registration (it keeps its agent id)';
    END IF;
    v_expected := pg_catalog.encode(pem.hmac_sha256(
        pg_catalog.convert_to(p_kind || E'\n' || p_agent_id::text || E'\n' || coalesce(p_sent_at, '')
                              || E'\n' || coalesce(p_payload, ''), 'UTF8'),
        v_secret), 'hex');
    -- Compared as digests, so the time taken says nothing about how much of the MAC was right.
    IF p_mac IS NULL
       OR pg_catalog.sha256(pg_catalog.convert_to(v_expected, 'UTF8'))
          <> pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.lower(p_mac), 'UTF8')) THEN
        RAISE EXCEPTION 'a % message for agent % failed authentication', p_kind, p_agent_id
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'the agent''s secret file does not match the PEM server: register the agent again with --register-agent --force-registration (it keeps its agent id)';
    END IF;
    IF p_kind <> 'heartbeat' THEN
        RETURN;
    END IF;
    BEGIN
        v_sent := p_sent_at::timestamptz;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'heartbeat of agent % has an unreadable sent_at %', p_agent_id, pg_catalog.quote_literal(p_sent_at)
            USING ERRCODE = 'invalid_authorization_specification';
    END;
    v_skew := pg_catalog.abs(pg_catalog.date_part('epoch', pg_catalog.now() - v_sent));
    IF v_skew > 300 THEN
        RAISE EXCEPTION 'heartbeat of agent % was sent at %, % s away from the PEM server''s clock (%)',
            p_agent_id, v_sent, pg_catalog.round(v_skew::numeric), pg_catalog.now()
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'synchronize the clocks of the agent host and the PEM server (NTP)';
    END IF;
    UPDATE pem.agent_secret s SET last_sent_at = v_sent
     WHERE s.agent_id = p_agent_id AND (s.last_sent_at IS NULL OR s.last_sent_at < v_sent);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'heartbeat of agent % sent at % is not newer than the last one accepted (a replay)',
            p_agent_id, v_sent
            USING ERRCODE = 'invalid_authorization_specification';
    END IF;
END
$fn$;
REVOKE ALL ON FUNCTION pem.authenticate_agent(text, integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.authenticate_agent(text, integer, text, text, text) TO pem_writer;

-- ---------------------------------------------------------------------------------------------
-- 6. What agents call
-- ---------------------------------------------------------------------------------------------

-- Records one heartbeat (MAC over the agent version) and returns whether the agent is active
-- and its heartbeat interval. Also repairs what agents may have changed on the shared roles.
CREATE FUNCTION pem.record_heartbeat(p_agent_id integer, p_agent_version text, p_sent_at text,
                                     p_mac text)
RETURNS TABLE (active boolean, heartbeat_interval integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_active   boolean;
    v_interval integer;
BEGIN
    PERFORM pem.authenticate_agent('heartbeat', p_agent_id, p_sent_at, p_agent_version, p_mac);
    PERFORM pem.repair_agent_roles();
    SELECT a.active, a.heartbeat_interval INTO v_active, v_interval
      FROM pem.agent a WHERE a.id = p_agent_id;
    IF v_active THEN
        INSERT INTO pem.agent_heartbeat AS h (agent_id, last_heartbeat, agent_version)
        VALUES (p_agent_id, pg_catalog.now(), p_agent_version)
        ON CONFLICT (agent_id) DO UPDATE
            SET last_heartbeat = EXCLUDED.last_heartbeat, agent_version = EXCLUDED.agent_version;
    END IF;
    RETURN QUERY SELECT coalesce(v_active, false), v_interval;
END
$fn$;
ALTER FUNCTION pem.record_heartbeat(integer, text, text, text) OWNER TO pem_writer;
REVOKE ALL ON FUNCTION pem.record_heartbeat(integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.record_heartbeat(integer, text, text, text) TO pem_agent;

-- For --verify-registration and the migration's login check: proves the caller holds the
-- agent's secret and says whether the agent is active.
CREATE FUNCTION pem.check_agent(p_agent_id integer, p_sent_at text, p_mac text)
RETURNS TABLE (active boolean, heartbeat_interval integer)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
BEGIN
    PERFORM pem.authenticate_agent('verify', p_agent_id, p_sent_at, '', p_mac);
    RETURN QUERY SELECT a.active, a.heartbeat_interval FROM pem.agent a WHERE a.id = p_agent_id;
END
$fn$;
REVOKE ALL ON FUNCTION pem.check_agent(integer, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.check_agent(integer, text, text) TO pem_agent;

-- The monitored servers and pgBouncer consoles bound to an agent (no passwords: those stay on
-- the agent host), replacing the collector's reads of the binding tables.
CREATE FUNCTION pem.agent_targets(p_agent_id integer)
RETURNS TABLE (target_type text, server_id integer, pgbouncer text, host text, port integer,
               database text, username text, sslmode text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT 'server', b.server_id, NULL::text, coalesce(b.host, s.server_addr), coalesce(b.port, s.port),
           coalesce(b.database, s.database)::text, coalesce(b.username, s.username)::text,
           coalesce(b.sslmode, 'prefer')
      FROM pem.agent_server_binding b JOIN pem.server s ON s.id = b.server_id
     WHERE b.agent_id = p_agent_id AND s.active
       AND EXISTS (SELECT 1 FROM pem.agent a WHERE a.id = p_agent_id AND a.active)
    UNION ALL
    SELECT 'pgbouncer', NULL, g.host || ':' || g.port::text, g.host, g.port, 'pgbouncer',
           g.username::text, coalesce(g.sslmode, 'prefer')
      FROM pem.agent_pgbouncer_binding g
     WHERE g.agent_id = p_agent_id
       AND EXISTS (SELECT 1 FROM pem.agent a WHERE a.id = p_agent_id AND a.active)
$fn$;
REVOKE ALL ON FUNCTION pem.agent_targets(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.agent_targets(integer) TO pem_agent, pem_admin;

-- pem.store_samples(agent_id, sent_at, batch, mac): stores a batch of samples, each in its own
-- subtransaction. A sample the server rejects as data (SQLSTATE classes 21, 22, 23: a value
-- that does not fit its column, a duplicate key within one sample ...) is skipped and returned
-- as (its index in the batch, SQLSTATE, message); the rest are stored. Anything else (MAC,
-- privileges, a read-only server) fails the whole call.
--
-- The function is generated here from the catalogue (pem.probe and the pemdata tables'
-- columns and keys), with one static statement pair per probe, so each session plans them once
-- and keeps the plans; no statement is built per sample at run time. Per sample: history rows
-- are inserted ON CONFLICT (delivery_key) DO NOTHING (a batch delivered twice is stored once),
-- latest values upserted (never replaced by older ones), and latest rows the sample no longer
-- has (a vanished mount point) deleted.
DO $store$
DECLARE
    p         record;
    v_cols    text[];
    v_types   text[];
    v_key     text[];
    v_ctx     text[];
    v_ctxval  text[];
    v_branch  text;
    v_branches text := '';
    v_match   text;
    v_updates text;
BEGIN
    FOR p IN SELECT internal_name, data_table FROM pem.probe ORDER BY id LOOP
        SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum),
               pg_catalog.array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
          INTO v_cols, v_types
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = pg_catalog.format('pemdata.%I', p.data_table)::regclass
           AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname NOT IN ('agent_id', 'server_id', 'pgbouncer', 'collected_at');
        SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
          INTO v_key
          FROM pg_catalog.pg_constraint c
          CROSS JOIN LATERAL pg_catalog.unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
         WHERE c.conrelid = pg_catalog.format('pemdata.%I', p.data_table)::regclass
           AND c.contype IN ('p', 'u');
        v_ctx := ARRAY['agent_id'];
        v_ctxval := ARRAY['p_agent_id'];
        v_match := 'd.agent_id = p_agent_id';
        IF 'server_id' = ANY (v_key) THEN
            v_ctx := v_ctx || 'server_id'::text;
            v_ctxval := v_ctxval || 'v_server'::text;
            v_match := v_match || ' AND d.server_id IS NOT DISTINCT FROM v_server';
        END IF;
        IF 'pgbouncer' = ANY (v_key) THEN
            v_ctx := v_ctx || 'pgbouncer'::text;
            v_ctxval := v_ctxval || 'v_bouncer'::text;
            v_match := v_match || ' AND d.pgbouncer IS NOT DISTINCT FROM v_bouncer';
        END IF;
        SELECT pg_catalog.string_agg(pg_catalog.format('%1$I = EXCLUDED.%1$I', c), ', ')
          INTO v_updates
          FROM pg_catalog.unnest(ARRAY['collected_at'] || v_cols) AS c
         WHERE c <> ALL (v_key);
        v_branch := pg_catalog.format(
$tpl$
            WHEN %1$L THEN
                WITH s AS (SELECT * FROM pg_catalog.jsonb_to_recordset(v_rows) AS x(delivery_key uuid, %2$s)),
                     h AS (INSERT INTO pemhistory.%3$I (%4$s, collected_at, delivery_key, %5$s)
                           SELECT %6$s, v_at, s.delivery_key, %7$s FROM s
                           ON CONFLICT (delivery_key) DO NOTHING)
                INSERT INTO pemdata.%3$I AS d (%4$s, collected_at, %5$s)
                SELECT %6$s, v_at, %7$s FROM s
                ON CONFLICT (%8$s) DO UPDATE SET %9$s
                WHERE d.collected_at <= EXCLUDED.collected_at;
                DELETE FROM pemdata.%3$I AS d WHERE %10$s AND d.collected_at < v_at;
$tpl$,
            p.internal_name,
            (SELECT pg_catalog.string_agg(pg_catalog.format('%I %s', c, t), ', ')
               FROM unnest(v_cols, v_types) AS u(c, t)),
            p.data_table,
            pg_catalog.array_to_string(v_ctx, ', '),
            (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c), ', ') FROM pg_catalog.unnest(v_cols) AS c),
            pg_catalog.array_to_string(v_ctxval, ', '),
            (SELECT pg_catalog.string_agg('s.' || pg_catalog.quote_ident(c), ', ') FROM pg_catalog.unnest(v_cols) AS c),
            (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c), ', ') FROM pg_catalog.unnest(v_key) AS c),
            v_updates,
            v_match);
        v_branches := v_branches || v_branch;
    END LOOP;

    EXECUTE pg_catalog.format(
$fn$
CREATE FUNCTION pem.store_samples(p_agent_id integer, p_sent_at text, p_batch text, p_mac text)
RETURNS TABLE (sample_index integer, sqlstate text, message text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
#variable_conflict error
DECLARE
    v_sample  jsonb;
    v_index   bigint;
    v_rows    jsonb;
    v_at      timestamptz;
    v_server  integer;
    v_bouncer text;
    v_indexes integer[] := '{}';
    v_states  text[] := '{}';
    v_errors  text[] := '{}';
BEGIN
    PERFORM pem.authenticate_agent('samples', p_agent_id, p_sent_at, p_batch, p_mac);
    FOR v_sample, v_index IN
        SELECT e.value, e.ordinality - 1 FROM pg_catalog.jsonb_array_elements(p_batch::jsonb) WITH ORDINALITY AS e
    LOOP
        BEGIN
            v_rows := v_sample -> 'rows';
            v_at := (v_sample ->> 'collected_at')::timestamptz;
            v_server := (v_sample ->> 'server_id')::integer;
            v_bouncer := v_sample ->> 'pgbouncer';
            CASE v_sample ->> 'probe'
%s
            ELSE
                RAISE EXCEPTION 'unknown probe %%', pg_catalog.quote_nullable(v_sample ->> 'probe')
                    USING ERRCODE = 'invalid_parameter_value';
            END CASE;
        EXCEPTION WHEN cardinality_violation OR data_exception OR integrity_constraint_violation THEN
            v_indexes := v_indexes || v_index::integer;
            v_states := v_states || SQLSTATE;
            v_errors := v_errors || SQLERRM;
        END;
    END LOOP;
    -- Multi-argument unnest is syntax, so it cannot be schema-qualified; search_path is pinned.
    RETURN QUERY SELECT * FROM unnest(v_indexes, v_states, v_errors);
END
$body$
$fn$, v_branches);
END
$store$;
ALTER FUNCTION pem.store_samples(integer, text, text, text) OWNER TO pem_writer;
REVOKE ALL ON FUNCTION pem.store_samples(integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.store_samples(integer, text, text, text) TO pem_agent;

-- ---------------------------------------------------------------------------------------------
-- 7. What the PEM admin calls
-- ---------------------------------------------------------------------------------------------

-- --unregister-agent: marks the agent inactive, takes its write secret away and drops its
-- dedicated agent<ID> role if the functions above made it. Returns the dropped role, if any;
-- no row when no such agent exists.
CREATE FUNCTION pem.unregister_agent(p_agent_id integer)
RETURNS TABLE (agent_id integer, dropped_role text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_user text;
    v_drop text;
BEGIN
    UPDATE pem.agent a SET active = false, unregistered_at = coalesce(a.unregistered_at, pg_catalog.now())
     WHERE a.id = p_agent_id
    RETURNING coalesce(a.agent_user::text, 'agent' || a.id::text) INTO v_user;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM pem.agent_secret s WHERE s.agent_id = p_agent_id;
    IF EXISTS (SELECT 1 FROM pem.agent_role ar WHERE ar.role_name::text = v_user AND ar.agent_id = p_agent_id)
       AND pem.drop_agent_user(v_user) THEN
        v_drop := v_user;
    END IF;
    RETURN QUERY SELECT p_agent_id, v_drop;
END
$fn$;
REVOKE ALL ON FUNCTION pem.unregister_agent(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.unregister_agent(integer) TO pem_admin;

-- The runner's version table is for administrators; agents have no business reading tables.
REVOKE ALL ON pem.schema_version FROM pem_agent;

-- ---------------------------------------------------------------------------------------------
-- 8. Certificate signing: configuration from the server's files only
-- ---------------------------------------------------------------------------------------------

-- The signer itself, for the definer functions that decide who may have what signed
-- (pem.sign_agent_csr for the admin). No grants: nobody calls it directly.
--
-- Its settings come from the server's configuration files only (pg_file_settings:
-- postgresql.conf, its includes and ALTER SYSTEM), never from SET or a role setting, which any
-- caller controls and which a pooled session passes on to the next client:
--     pem.ca_cert_file              default <data_directory>/ca_certificate.crt
--     pem.ca_key_file               default <data_directory>/ca_key.key
--     pem.agent_cert_validity_days  default 365 (1 to 3650)
-- The CA files must be regular files; they are opened without following a symbolic link and
-- read up to 1 MiB, so no setting can make the signer read a device, a FIFO or a huge file.
-- The CN must be an agent role the agent-role functions made (pem.agent_role), and, when
-- p_agent_user is given, exactly that role.
CREATE FUNCTION pem.sign_agent_certificate(p_csr text, p_agent_user text)
RETURNS text
LANGUAGE plpython3u
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
import errno, os, stat
from datetime import datetime, timedelta, timezone
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, ed448, rsa

CA_HINT = ('PEM keeps its CA as ca_certificate.crt and ca_key.key (unencrypted) in the PEM '
           'server data directory; pem.ca_cert_file and pem.ca_key_file in postgresql.conf '
           'point elsewhere')
LIMIT = 1 << 20

def fail(sqlstate, message, hint=None):
    # plpy.error raises; pass hint only when set, None would be printed as "None".
    kwargs = {'sqlstate': sqlstate}
    if hint:
        kwargs['hint'] = hint
    plpy.error(message, **kwargs)

# Plans live in SD so warm backends (pgBouncer keeps them) parse them once; caller-supplied
# text only ever travels as a parameter.
plans = SD.get('plans')
if plans is None:
    plans = {
        'agent': plpy.prepare(
            "SELECT r.rolcanlogin AND NOT r.rolsuper AND NOT r.rolreplication"
            "       AND NOT r.rolbypassrls AND NOT r.rolcreaterole AND NOT r.rolcreatedb"
            "       AND pg_catalog.pg_has_role(r.oid, 'pem_agent', 'MEMBER')"
            "       AND NOT pg_catalog.pg_has_role(r.oid, 'pem_admin', 'MEMBER') AS ok"
            "  FROM pg_catalog.pg_roles r"
            "  JOIN pem.agent_role ar ON ar.role_oid = r.oid AND ar.role_name = r.rolname"
            " WHERE r.rolname::pg_catalog.text OPERATOR(pg_catalog.=) $1", ['text']),
        # The files' values only: pg_file_settings ignores SET, role and database settings.
        # It parses the files on every read, so all three are read at once; the last entry
        # of a name wins, as when the server loads them.
        'settings': plpy.prepare(
            "SELECT name, setting FROM pg_catalog.pg_file_settings"
            " WHERE name OPERATOR(pg_catalog.=) ANY (ARRAY['pem.ca_cert_file', 'pem.ca_key_file',"
            "                                              'pem.agent_cert_validity_days'])"
            "   AND error IS NULL ORDER BY seqno"),
        'data_dir': plpy.prepare("SELECT pg_catalog.current_setting('data_directory') AS v"),
    }
    SD['plans'] = plans

file_settings = {}
for row in plpy.execute(plans['settings']):
    file_settings[row['name']] = (row['setting'] or '').strip()

def setting(name):
    return file_settings.get(name, '')

def not_after_of(cert):
    # cryptography >= 42 has the aware *_utc properties; 38 (bookworm) has naive UTC only.
    value = getattr(cert, 'not_valid_after_utc', None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=timezone.utc)

def open_file(what, path):
    """An open descriptor and identity of a regular file, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = 'it is a symbolic link' if e.errno == errno.ELOOP else (e.strerror or str(e))
        fail('58P01', 'could not open PEM CA %s "%s": %s' % (what, path, why), CA_HINT)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        fail('F0000', 'PEM CA %s "%s" is not a regular file' % (what, path), CA_HINT)
    if st.st_size > LIMIT:
        os.close(fd)
        fail('F0000', 'PEM CA %s "%s" is larger than 1 MiB' % (what, path), CA_HINT)
    return fd, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

def read_all(fd):
    chunks, total = [], 0
    while total <= LIMIT:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b''.join(chunks)[:LIMIT + 1]

def load_ca(cert_path, key_path):
    cert_fd, cert_id = open_file('certificate', cert_path)
    try:
        key_fd, key_id = open_file('key', key_path)
    except BaseException:
        os.close(cert_fd)
        raise
    try:
        # Replaced CA files (new inode, mtime or size) are picked up without a reconnect.
        cache_key = (cert_path, cert_id, key_path, key_id)
        cached = SD.get('ca')
        if cached is not None and cached[0] == cache_key:
            return cached[1], cached[2]
        cert_pem, key_pem = read_all(cert_fd), read_all(key_fd)
    finally:
        os.close(cert_fd)
        os.close(key_fd)

    problem = None
    try:
        ca_cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        problem = 'could not load PEM CA certificate "%s": %s' % (cert_path, e)
    if problem:
        fail('F0000', problem, CA_HINT)
    try:
        # Accepts PKCS#8 and traditional (SEC1/PKCS#1) PEM, RSA/EC/Ed25519/Ed448.
        ca_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        problem = 'could not load PEM CA key "%s": %s' % (key_path, e)
    if problem:
        fail('F0000', problem, CA_HINT)

    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        fail('F0000', 'PEM CA key "%s" does not belong to CA certificate "%s"' % (key_path, cert_path),
             CA_HINT)
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            fail('F0000', 'PEM CA certificate "%s" is not a CA certificate (CA:FALSE)' % cert_path,
                 CA_HINT)
    except x509.ExtensionNotFound:
        pass  # v1 CA certificates have no extensions; OpenSSL accepts them as trust anchors

    SD['ca'] = (cache_key, ca_cert, ca_key)
    return ca_cert, ca_key

# --- 1. The request itself.
if p_csr is None or not p_csr.strip():
    fail('22023', 'malformed certificate signing request: empty input')
problem = None
try:
    csr = x509.load_pem_x509_csr(p_csr.encode('utf-8'))
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    csr_key = csr.public_key()
    signature_ok = csr.is_signature_valid
except (ValueError, TypeError, UnsupportedAlgorithm) as e:
    problem = 'malformed certificate signing request: %s' % e
if problem:
    fail('22023', problem)
if not signature_ok:
    # Proves the requester holds the private key for the public key being certified.
    fail('22023', 'certificate signing request signature is invalid')
if len(cns) != 1:
    fail('22023', 'certificate signing request must have exactly one common name, found %d' % len(cns))
cn = cns[0].value
if isinstance(csr_key, rsa.RSAPublicKey) and csr_key.key_size < 2048:
    fail('22023', 'certificate signing request key is too weak: RSA %d bits, at least 2048 needed'
         % csr_key.key_size)

# --- 2. The CN is the login this certificate authenticates as (pgBouncer/PostgreSQL "cert"):
# only an agent role made by the agent-role functions, and only the one asked for.
if p_agent_user is not None and cn != p_agent_user:
    # A request made before the caller decided the agent user (an enrolment that gets a
    # dedicated agent<ID> role, or the user its token names) says just "agent"; the
    # certificate is then for the user the caller decided, and for no other.
    if cn != 'agent':
        fail('42501', 'refusing to sign a certificate for "%s": this request may only be for "%s"'
             % (cn, p_agent_user))
    cn = p_agent_user
is_agent = False
if isinstance(cn, str) and cn and '\x00' not in cn:
    rows = plpy.execute(plans['agent'], [cn])
    is_agent = bool(rows) and bool(rows[0]['ok'])
if not is_agent:
    fail('42501', 'refusing to sign a certificate for "%s": not a PEM agent user' % cn,
         'create it with pem.create_proxy_agent_user() first')

# --- 3. CA and validity, from the configuration files.
data_dir = plpy.execute(plans['data_dir'])[0]['v']
cert_path = setting('pem.ca_cert_file') or os.path.join(data_dir, 'ca_certificate.crt')
key_path = setting('pem.ca_key_file') or os.path.join(data_dir, 'ca_key.key')
ca_cert, ca_key = load_ca(cert_path, key_path)

days_text = setting('pem.agent_cert_validity_days') or '365'
try:
    days = int(days_text)
except ValueError:
    days = 0
if not 1 <= days <= 3650:
    fail('22023', 'invalid pem.agent_cert_validity_days "%s" in the server configuration: must be 1 to 3650'
         % days_text)

now = datetime.now(timezone.utc)
ca_not_after = not_after_of(ca_cert)
if ca_not_after <= now:
    fail('F0000', 'PEM CA certificate "%s" expired at %s' % (cert_path, ca_not_after.isoformat()),
         CA_HINT)
# A certificate outliving its CA would fail verification anyway; end it with the CA.
not_after = min(now + timedelta(days=days), ca_not_after)

# --- 4. Issue: a client-auth-only leaf; only the CN is copied, requested extensions are ignored.
try:
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
except x509.ExtensionNotFound:
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
builder = (
    x509.CertificateBuilder()
    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    .issuer_name(ca_cert.subject)
    .public_key(csr_key)
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - timedelta(minutes=5))  # tolerate clock skew between hosts
    .not_valid_after(not_after)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                 key_encipherment=True, data_encipherment=False,
                                 key_agreement=False, key_cert_sign=False, crl_sign=False,
                                 encipher_only=False, decipher_only=False), critical=True)
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr_key), critical=False)
    .add_extension(aki, critical=False)
)
# EdDSA signs without a separate digest; everything else with SHA-256.
algorithm = None if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) \
    else hashes.SHA256()
cert = builder.sign(private_key=ca_key, algorithm=algorithm)
return cert.public_bytes(serialization.Encoding.PEM).decode('ascii')
$fn$;
REVOKE ALL ON FUNCTION pem.sign_agent_certificate(text, text) FROM PUBLIC;

-- The admin's signer (registration), same name and signature as before: pem_admin members only,
-- for any agent role.
CREATE OR REPLACE FUNCTION pem.sign_agent_csr(p_csr text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
BEGIN
    -- Defence in depth behind the EXECUTE grant; session_user is the login, unchanged inside
    -- SECURITY DEFINER.
    IF NOT pg_catalog.pg_has_role(session_user, 'pem_admin', 'MEMBER') THEN
        RAISE EXCEPTION 'permission denied to sign agent certificates'
            USING ERRCODE = 'insufficient_privilege', HINT = 'grant pem_admin to the registering user';
    END IF;
    RETURN pem.sign_agent_certificate(p_csr, NULL);
END
$fn$;
REVOKE EXECUTE ON FUNCTION pem.check_agent_user_name(text) FROM PUBLIC;
