-- The PEM CA, as PEM's installer makes it: ca_certificate.crt, ca_key.key and root.crt in the
-- server's data directory (or where pem.ca_cert_file and pem.ca_key_file in the configuration
-- files point, as the signer reads them). Run by `pemworker pooler prepare-server
-- --install-schema` as a superuser; not a migration: a session-local function, gone when the
-- session ends.
--
-- The key is generated inside the server and never leaves it. An existing CA is never
-- replaced: every file is written under a fresh temporary name and linked into place, which
-- fails if the name exists; a CA with only one of its two files is an error, not a reason to
-- make a new one. Returns one row per file: its path and what was done.
CREATE FUNCTION pg_temp.pemworker_install_ca()
RETURNS TABLE (path text, action text)
LANGUAGE plpython3u
AS $fn$
import errno, os, socket, stat
from datetime import datetime, timedelta, timezone
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

LIMIT = 1 << 20

def setting(name):
    # The files' values only, as the signer reads them (a SET changes nothing).
    rows = plpy.execute(
        "SELECT setting FROM pg_catalog.pg_file_settings WHERE name OPERATOR(pg_catalog.=) %s"
        " AND error IS NULL ORDER BY seqno" % plpy.quote_literal(name))
    return (rows[len(rows) - 1]['setting'] or '').strip() if len(rows) else ''

data_dir = plpy.execute("SELECT pg_catalog.current_setting('data_directory') AS v")[0]['v']
cert_path = setting('pem.ca_cert_file') or os.path.join(data_dir, 'ca_certificate.crt')
key_path = setting('pem.ca_key_file') or os.path.join(data_dir, 'ca_key.key')
root_path = os.path.join(data_dir, 'root.crt')

def read_regular(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            plpy.error('"%s" is not a regular file' % path, sqlstate='F0000')
        chunks = []
        while sum(len(c) for c in chunks) <= LIMIT:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b''.join(chunks)
    finally:
        os.close(fd)

def write_new(path, data, mode):
    directory = os.path.dirname(path) or '.'
    tmp = os.path.join(directory, '.%s.%d.tmp' % (os.path.basename(path), os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno == errno.EEXIST:
            plpy.error('"%s" appeared while the PEM CA was being made; nothing was replaced' % path,
                       sqlstate='58P02')
        raise
    finally:
        os.unlink(tmp)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

have_cert, have_key = os.path.lexists(cert_path), os.path.lexists(key_path)
if have_cert != have_key:
    present, absent = (cert_path, key_path) if have_cert else (key_path, cert_path)
    plpy.error('the PEM CA is incomplete: "%s" exists but "%s" does not' % (present, absent),
               sqlstate='F0000',
               hint='restore the missing file from a backup; to have a new CA made instead, '
                    'move "%s" aside (every agent and pgBouncer certificate must then be issued again)'
                    % present)

result = []
if have_cert:
    cert_pem = read_regular(cert_path)
    result.append((cert_path, 'exists'))
    result.append((key_path, 'exists'))
else:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'PEM CA (%s)' % socket.gethostname())])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # The key first: a certificate without its key would be an incomplete CA.
    write_new(key_path, key_pem, 0o600)
    try:
        write_new(cert_path, cert_pem, 0o644)
    except BaseException:
        os.unlink(key_path)
        raise
    result.append((key_path, 'created'))
    result.append((cert_path, 'created'))

if not os.path.lexists(root_path):
    write_new(root_path, cert_pem, 0o644)
    result.append((root_path, 'created'))
elif cert_pem.strip() in read_regular(root_path):
    result.append((root_path, 'exists'))
else:
    result.append((root_path, 'exists without the PEM CA certificate'))
return result
$fn$;
