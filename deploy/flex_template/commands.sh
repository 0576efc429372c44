#!/usr/bin/env bash
# Build the tokenmill Flex Template, run it once, and schedule it nightly with Cloud Scheduler.
# Run from the repository root. Needs: gcloud, a project with Dataflow, Artifact Registry and
# Cloud Scheduler enabled, and a bucket. Nothing here runs on its own: set the variables first.
set -euo pipefail
PROJECT=${PROJECT:?set PROJECT}           # e.g. my-project
REGION=${REGION:-us-central1}
BUCKET=${BUCKET:?set BUCKET}              # e.g. my-bucket (gs://$BUCKET/tokenmill/build.yaml is the spec)
REPO=${REPO:-tokenmill}                   # Artifact Registry Docker repository
SA=${SA:-tokenmill-dataflow@$PROJECT.iam.gserviceaccount.com}   # worker service account
IMAGE=$REGION-docker.pkg.dev/$PROJECT/$REPO/tokenmill:latest
TEMPLATE=gs://$BUCKET/tokenmill/templates/tokenmill-build.json

# 1. The image (launcher + workers) and the template spec file.
gcloud artifacts repositories create "$REPO" --repository-format=docker --location="$REGION" || true
gcloud builds submit --tag "$IMAGE" --project "$PROJECT" -f deploy/flex_template/Dockerfile .
gcloud dataflow flex-template build "$TEMPLATE" --image "$IMAGE" --sdk-language PYTHON \
  --metadata-file deploy/flex_template/metadata.json --project "$PROJECT"

# 2. One run by hand.
gcloud dataflow flex-template run "tokenmill-$(date +%Y%m%d-%H%M%S)" --template-file-gcs-location "$TEMPLATE" \
  --region "$REGION" --project "$PROJECT" --service-account-email "$SA" \
  --parameters config=gs://$BUCKET/tokenmill/build.yaml \
  --parameters sdk_container_image="$IMAGE" \
  --temp-location gs://$BUCKET/tmp --staging-location gs://$BUCKET/staging

# 3. Nightly at 02:15 UTC from Cloud Scheduler (the scheduler's service account needs
#    roles/dataflow.developer and roles/iam.serviceAccountUser on $SA).
gcloud scheduler jobs create http tokenmill-nightly --location "$REGION" --project "$PROJECT" \
  --schedule "15 2 * * *" --time-zone UTC \
  --uri "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
  --http-method POST --oauth-service-account-email "$SA" \
  --message-body "{\"launchParameter\": {\"jobName\": \"tokenmill-nightly\", \"containerSpecGcsPath\": \"$TEMPLATE\", \"parameters\": {\"config\": \"gs://$BUCKET/tokenmill/build.yaml\", \"sdk_container_image\": \"$IMAGE\"}, \"environment\": {\"serviceAccountEmail\": \"$SA\", \"tempLocation\": \"gs://$BUCKET/tmp\"}}}"
