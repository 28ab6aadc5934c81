-- Migration 2: what a running agent (the worker) calls.
--
-- Agents log in as pem_agent members, often as one shared agent user through pgBouncer, so the
-- agent id is a parameter. Heartbeats go through a SECURITY DEFINER function (agents have no
-- write access to pem.agent_heartbeat); the schedule is a plain view-like function.

-- pgBouncer instances an agent reads statistics from (SHOW POOLS / SHOW STATS). The console
-- user's password, if any, lives on the agent host (~/.pgpass), never here.
CREATE TABLE pem.agent_pgbouncer_binding (
    agent_id integer NOT NULL REFERENCES pem.agent (id) ON DELETE CASCADE,
    host     text    NOT NULL,
    port     integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    username name    NOT NULL,
    sslmode  text    CHECK (sslmode IN ('disable', 'allow', 'prefer', 'require', 'verify-ca', 'verify-full')),
    PRIMARY KEY (agent_id, host, port)
);
GRANT SELECT ON pem.agent_pgbouncer_binding TO pem_agent;
GRANT SELECT, INSERT, UPDATE, DELETE ON pem.agent_pgbouncer_binding TO pem_admin;

-- Records one heartbeat. Returns whether the agent is registered and active, so an agent that
-- was unregistered learns it at its next heartbeat.
CREATE FUNCTION pem.record_heartbeat(p_agent_id integer, p_agent_version text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pem.agent WHERE id OPERATOR(pg_catalog.=) p_agent_id AND active) THEN
        RETURN false;
    END IF;
    INSERT INTO pem.agent_heartbeat AS h (agent_id, last_heartbeat, agent_version)
    VALUES (p_agent_id, pg_catalog.now(), p_agent_version)
    ON CONFLICT (agent_id) DO UPDATE
        SET last_heartbeat = EXCLUDED.last_heartbeat, agent_version = EXCLUDED.agent_version;
    RETURN true;
END
$fn$;
REVOKE ALL ON FUNCTION pem.record_heartbeat(integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.record_heartbeat(integer, text) TO pem_agent;

-- The effective schedule of one agent: every catalogue probe for every target it has (itself,
-- each active bound server, each bound pgBouncer), with the per-agent override if there is one.
-- Text columns only, so no type lookup is needed behind a transaction pool.
CREATE FUNCTION pem.agent_schedule(p_agent_id integer)
RETURNS TABLE (probe text, target_type text, server_id integer, pgbouncer text,
               interval_seconds integer, enabled boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
    WITH targets AS (
        SELECT 'agent'::text AS target_type, NULL::integer AS server_id, NULL::text AS pgbouncer
        UNION ALL
        SELECT 'server', b.server_id, NULL
          FROM pem.agent_server_binding b JOIN pem.server s ON s.id OPERATOR(pg_catalog.=) b.server_id
         WHERE b.agent_id OPERATOR(pg_catalog.=) p_agent_id AND s.active
        UNION ALL
        SELECT 'pgbouncer', NULL, g.host OPERATOR(pg_catalog.||) ':' OPERATOR(pg_catalog.||) g.port::text
          FROM pem.agent_pgbouncer_binding g
         WHERE g.agent_id OPERATOR(pg_catalog.=) p_agent_id
    )
    SELECT p.internal_name, t.target_type, t.server_id, t.pgbouncer,
           COALESCE(ps.interval, p.default_interval),
           COALESCE(ps.enabled, p.enabled_by_default)
      FROM targets t
      JOIN pem.probe p ON p.target_type OPERATOR(pg_catalog.=) t.target_type
      LEFT JOIN pem.probe_schedule ps
             ON ps.agent_id OPERATOR(pg_catalog.=) p_agent_id
            AND ps.probe_id OPERATOR(pg_catalog.=) p.id
            AND ps.server_id IS NOT DISTINCT FROM t.server_id
     WHERE EXISTS (SELECT 1 FROM pem.agent a WHERE a.id OPERATOR(pg_catalog.=) p_agent_id AND a.active)
$fn$;
REVOKE ALL ON FUNCTION pem.agent_schedule(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.agent_schedule(integer) TO pem_agent, pem_admin;
