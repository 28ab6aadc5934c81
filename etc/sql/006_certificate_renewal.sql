-- Migration 6: agents renew their own certificates.
--
-- A running agent has a new key's CSR signed by the PEM CA through its own login (its
-- certificate login through pgBouncer), before its certificate expires. The request is
-- authenticated twice: by the login (the certificate's CN must be the caller's login, which must
-- be the agent user of the agent id the request names) and by the agent's per-agent secret (an
-- HMAC over the CSR, as every other write of migration 3). So an agent cannot have a
-- certificate made for another agent's login, nor for another agent id with a stolen secret,
-- and the request asks for nothing but a leaf certificate: a CSR asking to be a CA is refused,
-- and the signer (pem.sign_agent_certificate) copies only the CN, bounds the validity by
-- pem.agent_cert_validity_days and the CA's own end, and issues CA:FALSE, client-auth only.
--
-- Conventions as in migration 3: SECURITY DEFINER functions pin search_path to pg_catalog,
-- pg_temp; EXECUTE is revoked from PUBLIC and granted to the agent roles' group only.

-- Every certificate issued by renewal, for the administrator (which agent, which login, until
-- when). No grants: agents cannot read or change it.
CREATE TABLE pem.agent_certificate_renewal (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    agent_id    integer     NOT NULL REFERENCES pem.agent (id) ON DELETE CASCADE,
    login       name        NOT NULL,
    serial      text        NOT NULL,
    not_after   timestamptz NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX ON pem.agent_certificate_renewal (agent_id, issued_at);
REVOKE ALL ON pem.agent_certificate_renewal FROM PUBLIC;
GRANT SELECT ON pem.agent_certificate_renewal TO pem_admin;

-- What a CSR asks for, read before anything is signed: its one CN, whether it asks to be a CA
-- (basicConstraints CA:TRUE, or keyCertSign in its key usage), and its signature's validity.
-- No grants: only the definer functions below call it.
CREATE FUNCTION pem.inspect_csr(p_csr text, OUT cn text, OUT asks_for_ca boolean)
LANGUAGE plpython3u
IMMUTABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

problem = None
try:
    csr = x509.load_pem_x509_csr((p_csr or '').encode('utf-8'))
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    extensions = list(csr.extensions)
    signature_ok = csr.is_signature_valid
except (ValueError, TypeError, UnsupportedAlgorithm) as e:
    problem = 'malformed certificate signing request: %s' % e
if problem:
    plpy.error(problem, sqlstate='22023')
if not signature_ok:
    plpy.error('certificate signing request signature is invalid', sqlstate='22023')
if len(cns) != 1:
    plpy.error('certificate signing request must have exactly one common name, found %d' % len(cns),
               sqlstate='22023')
asks = False
for ext in extensions:
    v = ext.value
    if isinstance(v, x509.BasicConstraints) and v.ca:
        asks = True
    if isinstance(v, x509.KeyUsage) and (v.key_cert_sign or v.crl_sign):
        asks = True
return (cns[0].value, asks)
$fn$;
REVOKE ALL ON FUNCTION pem.inspect_csr(text) FROM PUBLIC;

-- The serial (hex) and end of a certificate the signer issued, for the renewal record.
CREATE FUNCTION pem.certificate_facts(p_cert text, OUT serial text, OUT not_after timestamptz)
LANGUAGE plpython3u
IMMUTABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
from cryptography import x509
from datetime import timezone
cert = x509.load_pem_x509_certificate(p_cert.encode('ascii'))
# cryptography >= 42 has the aware *_utc properties; 38 (bookworm) has naive UTC only.
end = getattr(cert, 'not_valid_after_utc', None) or cert.not_valid_after.replace(tzinfo=timezone.utc)
return ('%x' % cert.serial_number, end.isoformat())
$fn$;
REVOKE ALL ON FUNCTION pem.certificate_facts(text) FROM PUBLIC;

-- The agent's renewal: signs p_csr for the caller's own login and returns the certificate (PEM).
-- p_mac is HMAC-SHA256 with the agent's secret over "certificate\n<agent_id>\n<sent_at>\n<csr>";
-- sent_at must be within 300 s of this server's clock. Refusals: 28000 (the secret or the login
-- does not belong to the agent), 42501 (a name other than the caller's, or a CA), 22023 (a
-- malformed request).
CREATE FUNCTION pem.renew_agent_certificate(p_agent_id integer, p_sent_at text, p_csr text,
                                            p_mac text)
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict error
DECLARE
    v_login  text := session_user;   -- the login, unchanged inside SECURITY DEFINER
    v_user   text;
    v_active boolean;
    v_sent   timestamptz;
    v_cn     text;
    v_ca     boolean;
    v_cert   text;
BEGIN
    PERFORM pem.authenticate_agent('certificate', p_agent_id, p_sent_at, p_csr, p_mac);
    BEGIN
        v_sent := p_sent_at::timestamptz;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'certificate request of agent % has an unreadable sent_at %', p_agent_id,
            pg_catalog.quote_literal(p_sent_at)
            USING ERRCODE = 'invalid_authorization_specification';
    END;
    IF pg_catalog.abs(pg_catalog.date_part('epoch', pg_catalog.now() - v_sent)) > 300 THEN
        RAISE EXCEPTION 'certificate request of agent % was sent at %, more than 300 s away from the PEM server''s clock (%)',
            p_agent_id, v_sent, pg_catalog.now()
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'synchronize the clocks of the agent host and the PEM server (NTP)';
    END IF;

    SELECT coalesce(a.agent_user::text, 'agent' || a.id::text), a.active INTO v_user, v_active
      FROM pem.agent a WHERE a.id = p_agent_id;
    IF NOT coalesce(v_active, false) THEN
        RAISE EXCEPTION 'agent % is not registered or inactive on this PEM server', p_agent_id
            USING ERRCODE = 'invalid_authorization_specification',
                  HINT = 'register the agent again with --register-agent --force-registration';
    END IF;
    -- The secret proves the agent id; the login must be that agent's own.
    IF v_user <> v_login THEN
        RAISE EXCEPTION 'login "%" is not the agent user of agent % ("%")', v_login, p_agent_id, v_user
            USING ERRCODE = 'invalid_authorization_specification';
    END IF;

    SELECT i.cn, i.asks_for_ca INTO v_cn, v_ca FROM pem.inspect_csr(p_csr) i;
    IF v_cn IS DISTINCT FROM v_login THEN
        RAISE EXCEPTION 'refusing to sign a certificate for "%": agent % may only renew its own, "%"',
            v_cn, p_agent_id, v_login
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF v_ca THEN
        RAISE EXCEPTION 'refusing to sign a CA certificate request for "%"', v_cn
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'an agent certificate is a client certificate: request no basicConstraints CA:TRUE and no certificate or CRL signing';
    END IF;

    v_cert := pem.sign_agent_certificate(p_csr, v_login);
    INSERT INTO pem.agent_certificate_renewal (agent_id, login, serial, not_after)
    SELECT p_agent_id, v_login, c.serial, c.not_after FROM pem.certificate_facts(v_cert) c;
    RETURN v_cert;
END
$fn$;
REVOKE ALL ON FUNCTION pem.renew_agent_certificate(integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pem.renew_agent_certificate(integer, text, text, text) TO pem_agent;
