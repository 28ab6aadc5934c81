-- Migration 4: enrolment without the admin's password (single-use registration tokens).
--
-- The PEM admin makes tokens (pem.create_enrolment_token); the server keeps only a token's
-- SHA-256, its expiry, remaining uses and constraints. An agent host enrols with a token alone:
-- it logs in through pgBouncer as pem_enrolment, a login that holds no credential at all and may
-- only call pem.enrol_agent, which checks the token, registers the agent, makes its agent user
-- if needed, signs its certificate only for that user, gives it its write secret, records which
-- token enrolled it, and uses the token up. SECURITY.md explains why a credential-less login is
-- safe here: the token is the credential, and it is checked inside the function.
--
-- Conventions as in migration 3.

-- ---------------------------------------------------------------------------------------------
-- 1. The enrolment login
-- ---------------------------------------------------------------------------------------------

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pem_enrolment') THEN
        -- No password, member of nothing: pg_hba.conf admits it only from pgBouncer (peer),
        -- and pgBouncer admits it only over TLS.
        CREATE ROLE pem_enrolment LOGIN NOINHERIT PASSWORD NULL;
    ELSIF EXISTS (SELECT 1 FROM pg_catalog.pg_roles
                   WHERE rolname = 'pem_enrolment' AND (rolsuper OR rolcreaterole OR rolcreatedb
                         OR rolreplication OR rolbypassrls))
          OR EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members WHERE member = 'pem_enrolment'::regrole) THEN
        RAISE EXCEPTION 'role pem_enrolment exists with more rights than enrolling agents needs'
            USING HINT = 'drop or rename it, then upgrade again';
    END IF;
END
$roles$;
GRANT USAGE ON SCHEMA pem TO pem_enrolment;
-- Recorded with the agent roles, though it is none (it is in neither pem_agent nor
-- pem_agent_pool, so the auth query never answers for it and the signer never signs for it):
-- every host that enrols shares it, so what one sets on it (role-level settings, a password)
-- is undone by pem.repair_agent_roles like on the agent roles, and pgBouncer's ident line
-- for it is kept by pem.sync_pooler_ident.
INSERT INTO pem.agent_role (role_oid, role_name, password)
SELECT r.oid, r.rolname, NULL FROM pg_catalog.pg_roles r WHERE r.rolname = 'pem_enrolment'
ON CONFLICT DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- 2. Tokens, and which one enrolled which agent
-- ---------------------------------------------------------------------------------------------

CREATE TABLE pem.enrolment_token (
    id           integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash   bytea       NOT NULL UNIQUE,          -- sha256 of the token; the token itself is never kept
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by   name        NOT NULL,
    expires_at   timestamptz NOT NULL,
    uses_allowed integer     NOT NULL CHECK (uses_allowed BETWEEN 1 AND 10000),
    uses_left    integer     NOT NULL CHECK (uses_left >= 0),
    agent_user   name,                                 -- NULL: each agent gets its own agent<ID>
    group_name   text,
    team         text,
    revoked_at   timestamptz,
    revoked_by   name,
    last_used_at timestamptz
);
REVOKE ALL ON pem.enrolment_token FROM PUBLIC;

ALTER TABLE pem.agent
    ADD COLUMN enrolled_by_token integer REFERENCES pem.enrolment_token (id),
    ADD COLUMN enrolled_at       timestamptz;
CREATE INDEX agent_enrolled_by_token_idx ON pem.agent (enrolled_by_token);
COMMENT ON COLUMN pem.agent.enrolled_by_token IS 'The enrolment token this agent registered with (NULL: registered by an admin).';

-- ---------------------------------------------------------------------------------------------
-- 3. What the admin calls
-- ---------------------------------------------------------------------------------------------

-- Makes a token and returns it once; only its hash stays on the server.
CREATE FUNCTION pem.create_enrolment_token(p_ttl interval, p_uses integer, p_agent_user text,
                                           p_group text, p_team text)
RETURNS TABLE (token_id integer, token text, expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_token text;
    v_id    integer;
    v_until timestamptz;
BEGIN
    IF p_ttl IS NULL OR p_ttl < interval '1 second' OR p_ttl > interval '30 days' THEN
        RAISE EXCEPTION 'invalid token lifetime %: it must be 1 second to 30 days', p_ttl
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_uses IS NULL OR p_uses NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'invalid number of uses %: it must be 1 to 10000', p_uses
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_agent_user IS NOT NULL THEN
        PERFORM pem.check_agent_user_name(p_agent_user);
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname::text = p_agent_user)
           AND NOT EXISTS (SELECT 1 FROM pem.agent_role ar WHERE ar.role_name::text = p_agent_user) THEN
            RAISE EXCEPTION 'role "%" exists and is not a PEM agent user', p_agent_user
                USING ERRCODE = 'duplicate_object';
        END IF;
    END IF;
    v_token := 'pem-enrol-' || pg_catalog.encode(pem.random_bytes(32), 'hex');
    v_until := pg_catalog.now() + p_ttl;
    INSERT INTO pem.enrolment_token (token_hash, created_by, expires_at, uses_allowed, uses_left,
                                     agent_user, group_name, team)
    VALUES (pg_catalog.sha256(pg_catalog.convert_to(v_token, 'UTF8')), session_user, v_until,
            p_uses, p_uses, p_agent_user, p_group, p_team)
    RETURNING id INTO v_id;
    RETURN QUERY SELECT v_id, v_token, v_until;
END
$fn$;
REVOKE ALL ON FUNCTION pem.create_enrolment_token(interval, integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.create_enrolment_token(interval, integer, text, text, text) TO pem_admin;

CREATE FUNCTION pem.enrolment_tokens()
RETURNS TABLE (token_id integer, state text, created_at timestamptz, created_by name,
               expires_at timestamptz, uses_allowed integer, uses_left integer, agent_user name,
               group_name text, team text, enrolled_agents integer[])
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT t.id,
           CASE WHEN t.revoked_at IS NOT NULL THEN 'revoked'
                WHEN t.uses_left = 0 THEN 'used'
                WHEN t.expires_at <= pg_catalog.now() THEN 'expired'
                ELSE 'valid' END,
           t.created_at, t.created_by, t.expires_at, t.uses_allowed, t.uses_left, t.agent_user,
           t.group_name, t.team,
           (SELECT pg_catalog.array_agg(a.id ORDER BY a.id) FROM pem.agent a WHERE a.enrolled_by_token = t.id)
      FROM pem.enrolment_token t
     ORDER BY t.id
$fn$;
REVOKE ALL ON FUNCTION pem.enrolment_tokens() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.enrolment_tokens() TO pem_admin;

CREATE FUNCTION pem.revoke_enrolment_token(p_token_id integer)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    UPDATE pem.enrolment_token t SET revoked_at = pg_catalog.now(), revoked_by = session_user
     WHERE t.id = p_token_id AND t.revoked_at IS NULL
    RETURNING true
$fn$;
REVOKE ALL ON FUNCTION pem.revoke_enrolment_token(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.revoke_enrolment_token(integer) TO pem_admin;

-- ---------------------------------------------------------------------------------------------
-- 4. The one thing the enrolment login may do
-- ---------------------------------------------------------------------------------------------

-- Enrols one agent with a token: checks it (refusals are SQLSTATE 28000 and change nothing),
-- registers the agent row, makes the agent user if needed (the token's, or a dedicated
-- agent<ID>), signs the CSR only for that user (a host that does not know the user, as for a
-- dedicated role whose id is not known before, asks with the CN "agent"), gives the agent its
-- write secret, records the
-- token on the agent row and uses the token up. p_details: group, team, owner and the
-- capability flags, as --register-agent takes them; a token's group and team win.
CREATE FUNCTION pem.enrol_agent(p_token text, p_agent_user text, p_display_name text,
                                p_host_name text, p_csr text, p_details jsonb)
RETURNS TABLE (agent_id integer, agent_user text, certificate text, secret text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    t        pem.enrolment_token;
    v_id     integer;
    v_user   text;
    v_cert   text;
    v_secret bytea;
    d        jsonb := coalesce(p_details, '{}'::jsonb);
BEGIN
    PERFORM pem.repair_agent_roles();
    IF p_token IS NULL OR p_token !~ '^pem-enrol-[0-9a-f]{64}$' THEN
        RAISE EXCEPTION 'malformed enrolment token'
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'a token is pem-enrol- and 64 hexadecimal digits, as pemworker pooler enrolment-token create prints it';
    END IF;
    SELECT * INTO t FROM pem.enrolment_token et
     WHERE et.token_hash = pg_catalog.sha256(pg_catalog.convert_to(p_token, 'UTF8'))
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown enrolment token'
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'ask the PEM admin for a token (pemworker pooler enrolment-token create)';
    ELSIF t.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'enrolment token % was revoked at %', t.id, t.revoked_at
            USING ERRCODE = 'invalid_authorization_specification';
    ELSIF t.uses_left = 0 THEN
        RAISE EXCEPTION 'enrolment token % is used up (% of % uses)', t.id, t.uses_allowed, t.uses_allowed
            USING ERRCODE = 'invalid_authorization_specification';
    ELSIF t.expires_at <= pg_catalog.now() THEN
        RAISE EXCEPTION 'enrolment token % expired at %', t.id, t.expires_at
            USING ERRCODE = 'invalid_authorization_specification';
    END IF;
    IF t.agent_user IS NOT NULL AND p_agent_user IS NOT NULL AND p_agent_user <> t.agent_user::text THEN
        RAISE EXCEPTION 'enrolment token % is limited to agent user %, not %', t.id, t.agent_user, p_agent_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF t.agent_user IS NULL AND p_agent_user IS NOT NULL THEN
        RAISE EXCEPTION 'enrolment token % gives each agent its own agent<ID> role, not %', t.id, p_agent_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'register without --pem-agent-user, or ask for a token for that agent user';
    END IF;
    IF p_display_name IS NULL OR pg_catalog.btrim(p_display_name) = '' THEN
        RAISE EXCEPTION 'an agent needs a display name' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO pem.agent (display_name, host_name, group_name, team, owner, allow_server_restart,
                           allow_batch_probes, batch_script_user, heartbeat_connection,
                           enrolled_by_token, enrolled_at)
    VALUES (p_display_name, p_host_name, coalesce(t.group_name, d ->> 'group'),
            coalesce(t.team, d ->> 'team'), d ->> 'owner',
            coalesce((d ->> 'allow_server_restart')::boolean, false),
            coalesce((d ->> 'allow_batch_probes')::boolean, false),
            d ->> 'batch_script_user',
            coalesce((d ->> 'heartbeat_connection')::boolean, false),
            t.id, pg_catalog.now())
    RETURNING id INTO v_id;
    v_user := coalesce(t.agent_user::text, 'agent' || v_id::text);
    UPDATE pem.agent a SET agent_user = v_user WHERE a.id = v_id;
    PERFORM pem.ensure_agent_user(v_user, CASE WHEN t.agent_user IS NULL THEN v_id END);
    v_cert := pem.sign_agent_certificate(p_csr, v_user);
    v_secret := pem.random_bytes(32);
    INSERT INTO pem.agent_secret (agent_id, secret) VALUES (v_id, v_secret);
    UPDATE pem.enrolment_token et SET uses_left = et.uses_left - 1, last_used_at = pg_catalog.now()
     WHERE et.id = t.id;
    RETURN QUERY SELECT v_id, v_user, v_cert, pg_catalog.encode(v_secret, 'hex');
END
$fn$;
REVOKE ALL ON FUNCTION pem.enrol_agent(text, text, text, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.enrol_agent(text, text, text, text, text, jsonb) TO pem_enrolment;

-- The admin drops agent users it no longer needs; the enrolment role is not one of them.
CREATE OR REPLACE FUNCTION pem.drop_agent_user(p_name text)
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
    IF p_name = 'pem_enrolment'
       OR NOT EXISTS (SELECT 1 FROM pem.agent_role ar JOIN pg_catalog.pg_roles r
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

-- On a server already prepared for pgBouncer's peer logins, the enrolment role gets its line.
SELECT pem.sync_pooler_ident();
