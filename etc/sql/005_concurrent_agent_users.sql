-- Concurrent registrations naming the same agent user.
--
-- Version 3 looked for the role in pem.agent_role and then in pg_roles before taking the lock,
-- in two statements with two snapshots: a registration that committed the role between them
-- was seen in pg_roles but not yet in pem.agent_role, and the second registration was refused
-- with "already exists and is not a PEM agent user". The fast path now only looks for a known
-- agent user; whether an unrelated role holds the name is decided under the lock, when every
-- registration that created the role has committed both the role and its pem.agent_role row.
CREATE OR REPLACE FUNCTION pem.ensure_agent_user(p_name text, p_agent_id integer DEFAULT NULL)
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
    IF EXISTS (SELECT 1 FROM pem.agent_role ar JOIN pg_catalog.pg_roles r
                   ON r.oid = ar.role_oid AND r.rolname = ar.role_name
                WHERE ar.role_name::text = p_name) THEN
        RETURN false;
    END IF;
    -- Agents have no rights on pem.agent_role, so they cannot hold this lock up.
    LOCK TABLE pem.agent_role IN SHARE ROW EXCLUSIVE MODE;
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
